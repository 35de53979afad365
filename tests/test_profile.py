"""Profiles: every bundled one validates, lookup order, and one-line errors that name the file and key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import typer

from offload.config import ModelConfig
from offload.errors import ProfileError
from offload.settings.profile import BUNDLED_DIR, Profile, list_profiles, load_profile

MIXTRAL = Path(__file__).parent / "fixtures" / "mixtral-8x7b-instruct-v0.1"
BUNDLED = sorted(path.stem for path in BUNDLED_DIR.glob("*.toml"))

BASE = """\
name = "test"
description = "a test profile"
[device]
kind = "cuda"
memory_gib = 12.0
link_gbps = 12.0
[cache]
experts_per_layer = 2
[prefetch]
enabled = true
experts = 2
[quant]
attention = "hqq:4:64"
experts = "hqq:2:16"
experts_overrides = { "0" = "hqq:3:64", "-1" = "hqq:3:64" }
[generation]
max_new_tokens = 512
temperature = 0.7
top_p = 0.9
top_k = 0
context = 4096
"""

# id -> (text replaced in BASE, replacement, what the error must name); all fail on load or on for_model.
BAD = {
    "unknown top-level key": ('name = "test"', 'name = "test"\ncolour = "red"', ["colour", '"red"']),
    "unknown nested key": ("experts_per_layer = 2", "experts_per_lyer = 2", ["cache.experts_per_lyer"]),
    "string memory": ("memory_gib = 12.0", 'memory_gib = "12"', ["device.memory_gib", '"12"', "GiB"]),
    "negative memory": ("memory_gib = 12.0", "memory_gib = -1.0", ["device.memory_gib", "-1.0"]),
    "infinite memory": ("memory_gib = 12.0", "memory_gib = inf", ["device.memory_gib", "inf"]),
    "zero link": ("link_gbps = 12.0", "link_gbps = 0", ["device.link_gbps", "GB/s"]),
    "bad device kind": ('kind = "cuda"', 'kind = "tpu"', ["device.kind", '"tpu"', "'cuda' or 'cpu'"]),
    "missing device kind": ('kind = "cuda"', "", ["device.kind", "missing"]),
    "K zero": (
        "experts_per_layer = 2",
        "experts_per_layer = 0",
        ["cache.experts_per_layer", "= 0", "'auto'"],
    ),
    "K bool": ("experts_per_layer = 2", "experts_per_layer = true", ["cache.experts_per_layer", "true"]),
    "K word": ("experts_per_layer = 2", 'experts_per_layer = "max"', ["cache.experts_per_layer", '"max"']),
    "K list with zero": ("experts_per_layer = 2", "experts_per_layer = [2, 0]", ["cache.experts_per_layer"]),
    "K above E": ("experts_per_layer = 2", "experts_per_layer = 9", ["cache.experts_per_layer", "9", "8"]),
    "K list length": (
        "experts_per_layer = 2",
        "experts_per_layer = [2, 2, 2]",
        ["cache.experts_per_layer", "3 entries", "32 layers"],
    ),
    "bad cache policy": (
        "experts_per_layer = 2",
        'experts_per_layer = 2\npolicy = "fifo"',
        ["cache.policy", '"fifo"', "'lrfu' or 'lru'"],
    ),
    "negative prefetch": ("experts = 2\n[quant]", "experts = -1\n[quant]", ["prefetch.experts", "-1"]),
    "prefetch above E": ("experts = 2\n[quant]", "experts = 9\n[quant]", ["prefetch.experts", "9"]),
    "prefetch enabled string": ("enabled = true", 'enabled = "yes"', ["prefetch.enabled", "true or false"]),
    "unknown quant spec": ('experts = "hqq:2:16"', 'experts = "hqq:5:16"', ["quant.experts", "hqq:5:16"]),
    "unknown role": ('attention = "hqq:4:64"', 'attn = "hqq:4:64"', ["quant.attn", "attention"]),
    "override key": ('"0" = "hqq:3:64"', '"first" = "hqq:3:64"', ['quant.experts_overrides."first"']),
    "override layer out of range": (
        '"0" = "hqq:3:64"',
        '"32" = "hqq:3:64"',
        ['quant.experts_overrides."32"', "0..31"],
    ),
    "override twice": (
        '"0" = "hqq:3:64"',
        '"31" = "hqq:3:64"',
        ['quant.experts_overrides."31"', "already has"],
    ),
    "override bad spec": ('"0" = "hqq:3:64"', '"0" = "bnb:nf3"', ['quant.experts_overrides."0"', "bnb:nf3"]),
    "temperature negative": ("temperature = 0.7", "temperature = -0.1", ["generation.temperature", "-0.1"]),
    "top_p above 1": ("top_p = 0.9", "top_p = 1.5", ["generation.top_p", "1.5", "(0, 1]"]),
    "top_k negative": ("top_k = 0", "top_k = -3", ["generation.top_k", "-3"]),
    # the flags' ranges, which generation would enforce naming --temperature or --top-k
    "temperature above the flag's": (
        "temperature = 0.7",
        "temperature = 500",
        ["generation.temperature = 500: allowed is 0 (greedy) or 0.0001 to 100"],
    ),
    "temperature below the flag's": (
        "temperature = 0.7",
        "temperature = 1e-8",
        ["generation.temperature = 1e-08: allowed is 0 (greedy) or 0.0001 to 100"],
    ),
    "top_k above the flag's": (
        "top_k = 0",
        "top_k = 2147483649",
        ["generation.top_k = 2147483649: allowed is a whole number from 0 (off) to 2147483648"],
    ),
    "context zero": ("context = 4096", "context = 0", ["generation.context", "= 0"]),
    "section not a table": ('name = "test"', 'cache = 2\nname = "test"', ["cache", "a table"]),
    "malformed TOML": ("[generation]", "[generation", ["not valid TOML", "line 16"]),
}


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the user's ~/.offload out of every test."""
    home = tmp_path / "home"
    monkeypatch.setenv("OFFLOAD_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def mixtral() -> ModelConfig:
    return ModelConfig.from_file(MIXTRAL / "config.json")


def _write(tmp_path: Path, case: str) -> Path:
    old, new, _ = BAD[case]
    assert old in BASE, case
    path = tmp_path / "bad.toml"
    text = BASE.replace(old, new, 1)
    if new.startswith("cache = "):  # the [cache] table would clash with the key that replaces it
        text = text.replace("[cache]\nexperts_per_layer = 2\n", "")
    path.write_text(text, encoding="utf-8")
    return path


def test_bundled_profiles_are_the_agreed_set() -> None:
    expected = {"cpu", "auto", "laptop-6gb", "laptop-8gb", "rtx3060-12gb", "t4-16gb", "rtx3080-mobile-16gb"}
    assert expected | {"rtx4090-24gb"} == set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_profile_validates_for_mixtral(name: str, mixtral: ModelConfig) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.description
    assert profile.source == BUNDLED_DIR / f"{name}.toml"
    resolved = profile.for_model(mixtral)
    assert len(resolved.expert_specs) == mixtral.num_hidden_layers
    # Each file says why its K is what it is, on its first line.
    assert profile.source.read_text(encoding="utf-8").startswith("# K = ")


@pytest.mark.parametrize("name", BUNDLED)
def test_to_toml_reads_back_to_the_same_profile(name: str, tmp_path: Path) -> None:
    profile = load_profile(name)
    copy = tmp_path / f"{name}.toml"
    copy.write_text(profile.to_toml(), encoding="utf-8")
    assert Profile.from_file(copy) == Profile.from_file(copy)  # deterministic
    assert Profile.from_file(copy).__dict__ | {"source": None} == profile.__dict__ | {"source": None}


def test_base_profile_is_valid(tmp_path: Path, mixtral: ModelConfig) -> None:
    path = tmp_path / "good.toml"
    path.write_text(BASE, encoding="utf-8")
    resolved = Profile.from_file(path).for_model(mixtral)
    assert resolved.experts_per_layer == (2,) * 32
    # "0" and "-1" override the first and the last layer.
    assert resolved.expert_specs[0] == resolved.expert_specs[31] == "hqq:3:64"
    assert set(resolved.expert_specs[1:31]) == {"hqq:2:16"}


def test_defaults_fill_omitted_sections(tmp_path: Path, mixtral: ModelConfig) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text('[device]\nkind = "cuda"\nmemory_gib = 8\n', encoding="utf-8")
    profile = Profile.from_file(path)
    assert profile.name == "tiny"
    assert profile.cache.experts_per_layer == "auto"
    assert profile.quant.gate == profile.quant.embed == profile.quant.lm_head == "none"
    assert profile.for_model(mixtral).is_auto


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_profile_gives_one_line_naming_file_key_and_value(
    case: str, tmp_path: Path, mixtral: ModelConfig
) -> None:
    path = _write(tmp_path, case)
    with pytest.raises(ProfileError) as caught:
        Profile.from_file(path).for_model(mixtral)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    for needed in BAD[case][2]:
        assert needed in message, (needed, message)


def test_missing_profile_names_where_it_looked(_isolated_home: Path) -> None:
    with pytest.raises(ProfileError) as caught:
        load_profile("no-such-profile")
    message = str(caught.value)
    assert "\n" not in message
    assert str(_isolated_home / "profiles" / "no-such-profile.toml") in message
    assert str(BUNDLED_DIR / "no-such-profile.toml") in message
    assert "rtx3060-12gb" in message  # the names that do exist


def test_missing_profile_path(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(str(tmp_path / "gone.toml"))


def test_lookup_order_path_then_home_then_bundled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _isolated_home: Path
) -> None:
    assert load_profile("rtx3060-12gb").source == BUNDLED_DIR / "rtx3060-12gb.toml"

    user_dir = _isolated_home / "profiles"
    user_dir.mkdir(parents=True)
    user = user_dir / "rtx3060-12gb.toml"
    user.write_text(BASE.replace("a test profile", "mine"), encoding="utf-8")
    assert load_profile("rtx3060-12gb").description == "mine"

    explicit = tmp_path / "elsewhere" / "rtx3060-12gb.toml"
    explicit.parent.mkdir()
    explicit.write_text(BASE.replace("a test profile", "explicit"), encoding="utf-8")
    assert load_profile(str(explicit)).description == "explicit"
    monkeypatch.chdir(explicit.parent)
    assert load_profile("rtx3060-12gb.toml").description == "explicit"  # ends in .toml: a path


def test_default_profile_follows_cuda() -> None:
    assert load_profile(None, cuda_available=False).name == "cpu"
    assert load_profile(None, cuda_available=True).name == "auto"


def test_list_shows_user_profiles_and_broken_ones(_isolated_home: Path) -> None:
    user_dir = _isolated_home / "profiles"
    user_dir.mkdir(parents=True)
    (user_dir / "mine.toml").write_text(BASE, encoding="utf-8")
    (user_dir / "broken.toml").write_text("[device\n", encoding="utf-8")
    entries = {entry.name: entry for entry in list_profiles()}
    assert set(BUNDLED) < set(entries)
    assert entries["mine"].profile is not None and entries["mine"].source.parent == user_dir
    assert entries["broken"].profile is None and "not valid TOML" in (entries["broken"].error or "")


# Through the CLI: the real entry point turns the error into one line on stderr and exit code 2.


def run_offload(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
) -> tuple[int, str, str]:
    """Run ``cli.main.run`` on an app with the plan and profiles commands; (exit code, stdout, stderr)."""
    import cli.main
    from cli import plan_cmd, profiles_cmd

    app = typer.Typer(pretty_exceptions_enable=False)

    @app.callback()
    def _main() -> None:
        """offload"""

    plan_cmd.register(app)
    profiles_cmd.register(app)
    monkeypatch.setattr(cli.main, "app", app)
    monkeypatch.setattr(sys, "argv", ["offload", *args])
    try:
        cli.main.run()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_plan_with_bad_profile_exits_2_with_one_line(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    path = _write(tmp_path, case)
    code, out, err = run_offload(monkeypatch, capsys, "plan", "--model", str(MIXTRAL), "--profile", str(path))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "Traceback" not in err
    assert BAD[case][2][0] in err


def test_cli_show_missing_profile_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = run_offload(monkeypatch, capsys, "profiles", "show", "no-such-profile")
    assert code == 2
    assert err.count("\n") == 1 and "looked in" in err


def test_cli_show_prints_resolved_toml(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    code, out, _ = run_offload(monkeypatch, capsys, "profiles", "show", "rtx3060-12gb")
    assert code == 0
    assert out.startswith(f"# {BUNDLED_DIR / 'rtx3060-12gb.toml'}")
    assert '[cache]\nexperts_per_layer = "auto"' in out


def test_cli_list_shows_every_profile(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_offload(monkeypatch, capsys, "profiles", "list")
    assert code == 0
    for name in BUNDLED:
        assert name in out


def test_cli_list_names_profiles_as_profile_takes_them_and_shows_errors_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    home = tmp_path / "home"
    (home / "profiles").mkdir(parents=True)
    text = (BUNDLED_DIR / "cpu.toml").read_text()
    (home / "profiles" / "mine.toml").write_text(text.replace('name = "cpu"', 'name = "other"', 1))
    (home / "profiles" / "broken.toml").write_text("[generation]\ntop_p = 7\n")
    monkeypatch.setenv("OFFLOAD_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_offload(monkeypatch, capsys, "profiles", "list")
    assert code == 0
    assert "mine" in out and "its name key says 'other'" in out
    monkeypatch.setenv("COLUMNS", "80")  # a narrow terminal still gets the whole error
    code, out, _ = run_offload(monkeypatch, capsys, "profiles", "list")
    error = next(line for line in out.splitlines() if line.startswith("error broken:"))
    assert "broken.toml: device.kind is missing: allowed is" in error  # file, key and what is allowed, uncut
    code, out, _ = run_offload(monkeypatch, capsys, "profiles", "show", "mine")  # the listed name works
    assert code == 0
