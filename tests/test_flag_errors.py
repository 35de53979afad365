"""Flags that would be silently dropped, and errors that must name what the user actually gave: each is one
line on stderr, before any weight is read, naming the flag (or the profile file and key) and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_cli_flags import baby  # noqa: F401  (a fixture)
from tests.test_cli_generate import offload_here


def one_line_error(monkeypatch, capfd, *args: str) -> str:
    code, out, err = offload_here(monkeypatch, capfd, *args)
    assert code == 2 and out == "", err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip().removeprefix("error: ")


def test_a_system_prompt_without_the_chat_template_is_refused(monkeypatch, capfd, tmp_path: Path) -> None:
    """--no-chat sends the prompt as raw text, and only the chat template places a system prompt."""
    missing = str(tmp_path / "none")  # the flags' error comes before the model is looked for
    err = one_line_error(
        monkeypatch, capfd, "generate", "-m", missing, "--no-chat", "--system", "pirate", "Hi"
    )
    assert err.startswith("--system needs the chat template, which --no-chat turns off")


def test_a_bad_quant_points_to_convert_where_the_spec_flags_are(monkeypatch, capfd) -> None:
    """--attention and --experts exist only on `offload convert`; --quant takes 'none' alone."""
    err = one_line_error(monkeypatch, capfd, "generate", "--quant", "foo", "Hi")
    assert err.startswith("--quant 'foo': only 'none' is allowed")
    assert "offload convert SRC DST --attention SPEC --experts SPEC" in err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_an_empty_stop_string_is_refused(monkeypatch, capfd, tmp_path: Path, command: str) -> None:
    """An empty --stop would be accepted and never end a reply; the other --stop values do not excuse it."""
    args = [command, "-m", str(tmp_path / "none"), "--stop", "\\n\\n", "--stop", ""]
    err = one_line_error(monkeypatch, capfd, *args, *(["Hi"] if command == "generate" else []))
    assert err == "--stop '' is empty: give the text that ends a reply, e.g. --stop '\\n\\n'"


@pytest.mark.parametrize(("value", "shown"), [("500", "500"), ("1e-8", "1e-08")])
def test_a_profile_temperature_out_of_range_names_the_file_and_key(
    monkeypatch, capfd, tmp_path: Path, value: str, shown: str
) -> None:
    """It used to pass the profile's checks and fail at generation, saying only 'temperature must be'."""
    profile = tmp_path / "hot.toml"
    profile.write_text(f'[device]\nkind = "cpu"\n[generation]\ntemperature = {value}\n', encoding="utf-8")
    err = one_line_error(monkeypatch, capfd, "generate", "--profile", str(profile), "Hi")
    assert err == f"{profile}: generation.temperature = {shown}: allowed is 0 (greedy) or 0.0001 to 100"


@pytest.mark.parametrize("profile", ["rtx3060-12gb", "auto"])
def test_a_cuda_profile_without_cuda_names_the_profile_not_a_device_flag(
    monkeypatch, capfd, profile: str
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = one_line_error(monkeypatch, capfd, "generate", "--profile", profile, "Hello")
    assert err == (
        f'profile {profile} sets device.kind = "cuda", and CUDA is not available on this machine; '
        "use --device cpu or --profile cpu"
    )
    err = one_line_error(monkeypatch, capfd, "generate", "--profile", profile, "--device", "cuda", "Hello")
    assert err == "--device cuda: CUDA is not available on this machine; use --device cpu"


@pytest.mark.parametrize(
    ("experts", "gib", "says"),
    [
        ("hqq:4:64", "0.003", ": the host tier reads experts from disk as they are stored, but "),
        ("none", "1e-06", " GiB holds 0 experts of "),
    ],
)
def test_a_host_budget_from_the_profile_is_named_as_its_key(
    monkeypatch,
    capfd,
    tmp_path: Path,
    baby: Path,  # noqa: F811  (a fixture)
    experts: str,
    gib: str,
    says: str,
) -> None:
    """[host] memory_gib in a profile is the host tier's budget, as --host-memory is; its errors name the key."""
    profile = tmp_path / "tier.toml"
    profile.write_text(
        f'[device]\nkind = "cpu"\n[cache]\nexperts_per_layer = "all"\n'
        f'[quant]\nattention = "none"\nexperts = "{experts}"\n[host]\nmemory_gib = {gib}\n',
        encoding="utf-8",
    )
    args = ["generate", "-m", str(baby), "--dtype", "float32", "--threads", "1", "Hi"]
    code, _, err = offload_here(monkeypatch, capfd, *args, "--profile", str(profile))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {profile}: host.memory_gib = {float(gib)}{says}"), err
    assert "--host-memory" not in err
