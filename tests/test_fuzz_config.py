"""Hostile configs: random YAML and `--set` overrides end in a typed Config or one ConfigError line naming the key.

Most cases run `load_config` in-process (hypothesis, derandomized so the suite is the same every
run); a few hostile files go through `train.py` to check the exit code and the one stderr line.
A returned Config must hold exactly the values given, and survive a dump/load round trip.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sae_jax.config import PATH_KEYS, Config, ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
# The same 60 cases every run; SAE_FUZZ_EXAMPLES=5000 hunts with fresh random ones.
HUNT = int(os.environ.get("SAE_FUZZ_EXAMPLES", 0))
FUZZ = settings(
    max_examples=HUNT or 60, deadline=None, derandomize=not HUNT, database=None, suppress_health_check=list(HealthCheck)
)


def fields(cls=Config, prefix=""):
    """{dotted key: type} for every leaf field."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        out.update(fields(t, f"{prefix}{f.name}.") if dataclasses.is_dataclass(t) else {f"{prefix}{f.name}": t})
    return out


FIELDS = fields()
SECTIONS = ["sae", "data", "train", "run", "data.synthetic", "data.disk", "data.model", "data.text"]

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.dates(),
    st.binary(max_size=4),
)


def plausible(t):
    """Values of about the right type, so the value checks (not only the type checks) get exercised."""
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return st.sampled_from(list(typing.get_args(t)) + ["other"])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return st.one_of(*[plausible(a) for a in typing.get_args(t)])
    if t is type(None):
        return st.none()
    if t is bool:
        return st.booleans()
    if t is int:
        return st.integers(-3, 5000)
    if t is float:
        return st.one_of(st.floats(-1, 10), st.sampled_from(["1e-3", "5e-5", ".inf", "nan", "1e400"]))
    return st.text(max_size=10)


@st.composite
def config_data(draw):
    """Nested plain data: some real keys with plausible or junk values, and now and then an unknown key."""
    data: dict = {}
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=6, unique=True)):
        value = draw(st.one_of(plausible(FIELDS[key]), junk))
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    if draw(st.integers(0, 4)) == 0:
        section = draw(st.sampled_from(["", *SECTIONS]))
        node = data
        for p in filter(None, section.split(".")):
            node = node.setdefault(p, {})
        node[draw(st.text(min_size=1, max_size=8))] = draw(junk)
    if draw(st.integers(0, 9)) == 0:  # a section that is not a mapping
        data[draw(st.sampled_from(["sae", "data", "train", "run"]))] = draw(junk)
    return data


@st.composite
def overrides(draw):
    out = []
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.one_of(st.sampled_from(sorted(FIELDS) + SECTIONS), st.text(max_size=10)))
        value = draw(st.one_of(plausible(FIELDS.get(key, str)), junk))
        raw = draw(
            st.one_of(
                st.just(yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()),
                st.text(max_size=10),
            )
        )
        out.append(draw(st.sampled_from([f"{key}={raw}", key, f"{key}=", f"{key} = {raw}"])))
    return out


def check_outcome(path: Path | None, sets: list[str], data) -> None:
    try:
        cfg = load_config(path, sets)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and "\r" not in msg and 0 < len(msg) < 2000, msg
        keys = {s.split("=", 1)[0].strip().split(".")[0] for s in sets} | set(SECTIONS)
        try:
            parsed = yaml.safe_load(path.read_bytes()) if path else None
        except Exception:  # not YAML at all
            parsed = None
        keys |= {str(k) for k in parsed} if isinstance(parsed, dict) else set()
        keys |= {repr(k) for k in keys}  # a key that does not print on one line is shown as its repr
        starts = ([f"{path}: "] if path else []) + ["--set "] + [f"{k}{sep}" for k in keys for sep in (": ", ".")]
        assert any(msg.startswith(s) for s in starts), msg  # names the file, the --set or the key path
        return
    assert isinstance(cfg, Config)
    again = load_config(_write(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg
    if not sets:  # every key given is held with the value given
        for key, value in _leaves(data):
            held = cfg
            for part in key.split("."):
                held = getattr(held, part)
            want = float(value) if FIELDS[key] is float else value
            if key in PATH_KEYS and isinstance(value, str) and value and not os.path.isabs(value):
                # relative to the config file's folder: run.out_dir always, the others when they name something
                # there or start with ./ or ../
                joined = os.path.normpath(path.parent / value)
                if key == "run.out_dir" or os.path.exists(joined) or value.startswith(("./", "../")):
                    want = joined
            assert held == want or (isinstance(want, float) and math.isnan(want) and math.isnan(held)), (
                key,
                value,
                held,
            )


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in FIELDS:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _write(text: str | bytes) -> Path:
    f = tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False)
    f.write(text.encode() if isinstance(text, str) else text)
    f.close()
    return Path(f.name)


@FUZZ
@given(config_data())
def test_random_yaml_configs(data):
    path = _write(yaml.safe_dump(data, allow_unicode=True))
    try:
        check_outcome(path, [], data)
    finally:
        path.unlink()


@FUZZ
@given(config_data(), overrides())
def test_random_set_overrides(data, sets):
    path = _write(yaml.safe_dump(data, allow_unicode=True))
    try:
        check_outcome(path, sets, data)
    finally:
        path.unlink()


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
@example(b"train: {steps: " + b"[" * 5000 + b"]" * 5000 + b"}")  # deeper than Python's recursion limit
@example(b"train: {lr: " + b"9" * 400 + b"}")  # an int no float can hold
@example(b"train: {steps: " + b"9" * 5000 + b"}")  # more digits than Python parses
@example(b"\xff\xfe\x00")
@example(b"a: &a [*a]\nsae: *a")  # a list that contains itself
@example(b"- 1\n- 2")
@example(b"!!python/object/apply:os.system ['true']")
def test_random_bytes_as_config_file(raw):
    path = _write(raw)
    try:
        check_outcome(path, [], {})
    finally:
        path.unlink()


def test_yaml_alias_bomb_is_one_short_line():
    """Nine levels of aliases: a few hundred bytes whose repr would be gigabytes."""
    lines = ["x0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"] + [
        f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)
    ]
    path = _write("train:\n  steps:\n" + "".join(f"    {l}\n" for l in lines))
    with pytest.raises(
        ConfigError, match=r"^train\.steps: expected an integer, found dict \{'x0': \[1, 2, 3, 4, 5, 6, \.\.\.\], "
    ) as e:
        load_config(path)
    assert len(str(e.value)) < 1000


# A few through the entry point: exit 1, one line on stderr, nothing written.
CLI_CASES = [
    (b"\x00\x01\x02garbage: [", [], "not valid YAML"),
    (b"train: {steps: " + b"[" * 5000 + b"]" * 5000 + b"}", [], "not valid YAML (nested too deeply)"),
    (b"train: {lr: " + b"9" * 400 + b"}", ["train.steps=" + "9" * 5000], "--set train.steps: value '9999"),
    (b"", ["sae.d_in=4", "sae.d_in.x=3"], "--set sae.d_in.x: sae.d_in is a value, not a section"),
]


@pytest.mark.parametrize("text, sets, expected", CLI_CASES)
def test_hostile_configs_through_the_cli_are_one_line(tmp_path, text, sets, expected):
    (tmp_path / "c.yaml").write_bytes(text)
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(tmp_path / "c.yaml"),
        "--set",
        f"run.out_dir={tmp_path / 'run'}",
    ]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ") and expected in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
