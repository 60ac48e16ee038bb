"""`python steer.py`: plain and steered generations side by side; one-line errors."""

from __future__ import annotations

import pytest
from sae_helpers import entry_point, run_entry, without_progress


@pytest.fixture(scope="module")
def steer_py():
    return entry_point("steer")


def test_alpha_zero_prints_the_plain_text_and_a_large_alpha_changes_it(ws, steer_py, capsys):
    args = [
        "--sae",
        ws.sae,
        "--model",
        ws.model,
        "--prompt",
        "Tell me about rivers.",
        "--feature",
        5,
        "--alpha",
        0,
        "--alpha",
        300,
        "--max-new-tokens",
        6,
    ]
    rc, out, err = run_entry(steer_py, args, capsys)
    assert rc == 0, err
    prompt, plain, zero, big = out.splitlines()
    assert (
        prompt == "prompt (15 tokens): 'Tell me about rivers.'"
    )  # BOS, header (3), \n\n, 5 text tokens, eot, header (3), \n\n
    assert plain.startswith("plain: '")
    assert zero == "feature 5 add 0 at layer 2 input: " + plain.removeprefix("plain: ")
    assert big.startswith("feature 5 add 300 at layer 2 input: '") and big.split(": ", 1)[1] != plain.split(": ", 1)[1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--feature", 128], "error: feature: expected an id in 0..127 (the SAE has 128 latents), found 128"),
        (["--feature", 1, "--mode", "scale"], None),
    ],
)
def test_bad_arguments(ws, steer_py, capsys, extra, message):
    args = ["--sae", ws.sae, "--model", ws.model, "--prompt", "Hi", "--alpha", 1, *extra]
    if message is None:  # argparse's own refusal: exit 2 with usage
        with pytest.raises(SystemExit) as e:
            steer_py.main([str(a) for a in args])
        assert e.value.code == 2 and "invalid choice: 'scale'" in capsys.readouterr().err
        return
    rc, out, err = run_entry(steer_py, args, capsys)
    assert (rc, out, without_progress(err)) == (1, "", message + "\n")
