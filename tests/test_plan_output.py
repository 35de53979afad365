"""What `offload plan` prints, checked against its own JSON: which hit rate is which (the device cache's, the
host tier's), one tok/s per policy wherever it is shown, the context it was given, the dtype and the cores a
run would use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_profile import run_offload

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "offload" / "demo"
# The source tree's cpu profile, which the package ships (an editable install may map `offload.profiles`
# to another checkout's).
CPU = str(ROOT / "profiles" / "cpu.toml")

# The demo model as `offload convert --experts hqq:4:64 --attention hqq:4:64` stores it, every expert
# "resident": with a host budget the host computes the experts straight from the tier (the audit's case).
CPU_INT4 = """
name = "cpu-int4"
[device]
kind = "cpu"
memory_gib = 16.0
[cache]
experts_per_layer = "all"
[quant]
attention = "hqq:4:64"
experts = "hqq:4:64"
[host]
cores = 4
memory_gbps = 45.0
"""
# Two device slots a layer on a GPU in front of the tier: the device cache hits 31%, the tier 57% of the rest.
GPU_K2 = """
name = "gpu-k2"
[device]
kind = "cuda"
memory_gib = 8.0
link_gbps = 12.0
[cache]
experts_per_layer = 2
[quant]
attention = "hqq:4:64"
experts = "hqq:4:64"
[host]
cores = 4
memory_gbps = 45.0
"""


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "400")  # every printed line on one line


def _profile(tmp_path: Path, text: str) -> str:
    path = tmp_path / "profile.toml"
    path.write_text(text)
    return str(path)


def _plan(monkeypatch: pytest.MonkeyPatch, capsys, *args: str) -> tuple[str, dict]:
    """The printed plan and its JSON, for the same arguments."""
    code, out, err = run_offload(monkeypatch, capsys, "plan", *args)
    assert code == 0, err
    code, as_json, err = run_offload(monkeypatch, capsys, "plan", *args, "--json")
    assert code == 0, err
    return out, json.loads(as_json)


def _line(out: str, start: str) -> str:
    return next(line for line in out.splitlines() if line.strip().startswith(start))


def test_experts_from_the_tier_name_the_tiers_hit_rate_and_one_speed_per_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The audit: 16 of the demo's 32 experts in RAM, computed there. There is no device cache, so no device
    hit rate; the tier hits 57%; each policy has one figure, with the disk reads, and the arithmetic gets to it."""
    profile = _profile(tmp_path, CPU_INT4)
    out, plan = _plan(monkeypatch, capsys, "-m", str(DEMO), "-p", profile, "--host-memory", "0.003")
    assert plan["experts_from_host_tier"] and plan["host_tier"]["hit_rate"] == pytest.approx(0.575)
    headline = _line(out, "decode:")
    assert f"~{plan['predicted_tok_s']:.2f} tok/s" in headline
    assert "host tier hit rate 57%" in headline and "expected hit rate" not in out
    assert "copying every miss" not in headline  # nothing is copied: the host computes every expert
    with_disk = plan["tok_s_with_disk"]
    shown = ", ".join(f"{policy} {tok_s:.2f}" for policy, tok_s in with_disk.items())
    assert f"decode by policy (estimates, tok/s, with the disk reads): {shown};" in out
    last = _line(out, "with the disk reads")  # the arithmetic's last line: from the figures above to these
    for policy, tok_s in with_disk.items():
        before = 1e3 / plan["speeds"]["tok_s"][policy]
        assert f"{policy} {before:.2f} + " in last and f"-> {tok_s:.2f} tok/s" in last
    assert "hit rate 57% of the chosen experts" in _line(out, "│ host   │ expert tier")


def test_slots_in_front_of_the_tier_name_both_hit_rates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    profile = _profile(tmp_path, GPU_K2)
    out, plan = _plan(monkeypatch, capsys, "-m", str(DEMO), "-p", profile, "--host-memory", "0.003")
    device_hit, tier_hit = plan["expected_hit_rate"], plan["host_tier"]["hit_rate"]
    assert (round(device_hit, 2), round(tier_hit, 2)) == (0.31, 0.57)
    headline = _line(out, "decode:")
    assert (
        f"~{plan['run_tok_s']:.2f} tok/s hybrid" in headline
        and f"device cache hit rate {device_hit:.0%}" in headline
    )
    assert f"the host tier hits {tier_hit:.0%} of those misses" in headline
    assert f"hit rate {tier_hit:.0%} of the device cache's misses" in _line(out, "│ host   │ expert tier")
    assert f"device cache hit rate {device_hit:.1%}" in _line(out, "layer 0:")
    shown = ", ".join(f"{policy} {tok_s:.2f}" for policy, tok_s in plan["tok_s_with_disk"].items())
    assert f"decode by policy (estimates, tok/s, with the disk reads): {shown};" in out


def test_without_a_host_budget_the_policies_are_as_computed(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    out, plan = _plan(monkeypatch, capsys, "-m", str(DEMO), "-p", CPU)
    shown = ", ".join(f"{policy} {tok_s:.2f}" for policy, tok_s in plan["speeds"]["tok_s"].items())
    assert f"decode by policy (estimates, tok/s): {shown}; the arithmetic:" in out
    assert "with the disk reads" not in out
    assert "every expert resident on the device" in _line(out, "decode:")


def test_the_disk_line_follows_the_policies_sums_and_what_follows_is_said_to_be_without() -> None:
    from offload.settings.plan_tiers import with_disk_line

    sums = ("one expert: …", "layer 0: …", "copy-only: …", "host-only: …", "hybrid: …")
    assert with_disk_line(sums, "with the disk reads: …") == (*sums, "with the disk reads: …")
    what_if = "if torch's int4 GPU kernel ran the 4-bit weights (…): host-only 1.00, hybrid 2.00 tok/s, from"
    assert with_disk_line((*sums, what_if), "with the disk reads: …") == (
        *sums,
        "with the disk reads: …; the lines below are without them",
        what_if,
    )


# The context: a --context beyond the model's window is refused, as generate refuses a --max-new-tokens that
# cannot fit it; a profile's context (sized for Mixtral) is capped, as a run caps it, and the plan says so.


def test_a_context_beyond_the_models_window_is_refused(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code, out, err = run_offload(monkeypatch, capsys, "plan", "-m", str(DEMO), "--context", "100000")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--context 100000 does not fit the model's context of 4096 tokens; give at most 4096" in err
    out, plan = _plan(monkeypatch, capsys, "-m", str(DEMO), "--context", "4096")
    assert plan["context"] == 4096 and "note: context" not in out
    assert not any(notice.startswith("context") for notice in plan["notices"])


def test_a_profiles_longer_context_is_capped_with_a_notice(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    out, plan = _plan(monkeypatch, capsys, "-m", str(DEMO), "-p", "rtx3060-12gb")
    notice = (
        "context: the profile's generation.context of 8192 tokens is capped at the model's 4096 "
        "(its max_position_embeddings), as a run caps it"
    )
    assert plan["context"] == 4096 and plan["notices"] == [notice]
    assert f"note: {notice}" in out


# The dtype: the one a run would use (offload.settings.resolve), so that the KV cache and dense rows are its.


@pytest.mark.parametrize(
    "args",
    [(), ("--host-memory", "0.003"), ("--dtype", "bfloat16"), ("--dtype", "float16")],
    ids=["cpu", "cpu-with-a-tier", "dtype-bf16", "dtype-fp16"],
)
def test_the_plan_uses_the_dtype_a_run_would(args: tuple[str, ...], monkeypatch, capsys) -> None:
    from offload.config import ModelConfig
    from offload.settings.flags import LoadFlags
    from offload.settings.resolve import resolve_settings

    _, plan = _plan(monkeypatch, capsys, "-m", str(DEMO), "-p", CPU, *args)
    given = dict(zip(args[::2], args[1::2], strict=True))
    flags = LoadFlags(
        profile=CPU,
        host_memory=float(given["--host-memory"]) if "--host-memory" in given else None,
        dtype=given.get("--dtype"),
    )
    config = ModelConfig.from_file(DEMO / "config.json")
    run = resolve_settings(config, flags)
    assert plan["compute_dtype"] == (run.dtype or config.torch_dtype)


def test_the_float_demo_on_a_cpu_is_planned_in_float32(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The demo is stored in bf16; `chat` runs it in float32 on a CPU (faster there), and so does the plan."""
    out, plan = _plan(monkeypatch, capsys, "-m", str(DEMO), "-p", CPU)
    assert plan["compute_dtype"] == "float32"
    assert plan["kv_cache_bytes"] == 2 * 4 * 2 * 32 * 4096 * 4  # K and V, 4 layers, 2 KV heads of 32, fp32
    assert plan["dense"]["embed"] == 5120 * 256 * 4 and plan["expert_bytes"] == [3 * 256 * 448 * 4] * 4
    assert "4096 tokens, float32" in _line(out, "│ device │ KV cache")
    assert "note: dtype: float32, as a run on a CPU picks for a small bfloat16 float model" in out
    bf16 = _plan(monkeypatch, capsys, "-m", str(DEMO), "-p", CPU, "--dtype", "bfloat16")[1]
    assert bf16["kv_cache_bytes"] * 2 == plan["kv_cache_bytes"]
    assert not any(notice.startswith("dtype") for notice in bf16["notices"])


@pytest.mark.parametrize("profile", ["rtx3060-12gb", "quantized"])
def test_a_gpu_or_a_quantized_model_keeps_the_checkpoints_dtype(
    profile: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    chosen = _profile(tmp_path, CPU_INT4) if profile == "quantized" else profile
    _, plan = _plan(monkeypatch, capsys, "-m", str(DEMO), "-p", chosen)
    assert plan["compute_dtype"] == "bfloat16"
    assert not any(notice.startswith("dtype") for notice in plan["notices"])


def test_a_bad_dtype_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code, out, err = run_offload(monkeypatch, capsys, "plan", "-m", str(DEMO), "--dtype", "int8")
    assert code == 2 and out == "" and err.count("\n") == 1 and "--dtype 'int8' is not one of" in err


# The host's cores: the bundled cpu profile's are "auto", this machine's, as a run's default threads count them.


@pytest.fixture
def three_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine whose process may run on 3 physical cores (4 logical CPUs), OMP_NUM_THREADS unset."""
    from offload.settings import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "physical_cores", lambda: 3)
    monkeypatch.setattr(threads, "available_cpus", lambda: 4)


def test_the_cpu_profile_plans_this_machines_cores(three_cores: None, monkeypatch, capsys) -> None:
    out, plan = _plan(monkeypatch, capsys, "-m", str(DEMO), "-p", CPU)
    assert plan["host_cores"] == 3
    assert 'note: host: 3 cores, as a run here uses them (the profile\'s cores = "auto")' in out
    assert "on 3 cores ×" in _line(out, "layer 0:") and "4 cores" not in out


def test_omp_num_threads_sets_the_cores_as_it_sets_a_runs_threads(
    three_cores: None, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _plan(monkeypatch, capsys, "-m", str(DEMO), "-p", CPU)[1]["host_cores"] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "64")  # no more than the CPUs the process may use
    assert _plan(monkeypatch, capsys, "-m", str(DEMO), "-p", CPU)[1]["host_cores"] == 4


def test_a_cpu_profiles_own_count_is_kept_and_said_when_it_is_not_this_machines(
    three_cores: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out, plan = _plan(monkeypatch, capsys, "-m", str(DEMO), "-p", _profile(tmp_path, CPU_INT4))
    assert plan["host_cores"] == 4 and "4 cores ×" in out
    notice = (
        'host: the profile\'s 4 cores; a run on this machine uses 3 (cores = "auto" plans for this machine)'
    )
    assert notice in plan["notices"]
    # A GPU profile's [host] describes the machine it is for, not necessarily this one: kept, nothing said.
    assert not any(
        n.startswith("host") for n in _plan(monkeypatch, capsys, "-p", "rtx3060-12gb")[1]["notices"]
    )


def test_cores_auto_is_read_and_written_back_and_a_bad_value_is_one_line(tmp_path: Path) -> None:
    from offload.errors import ProfileError
    from offload.settings.profile import Profile, load_profile

    cpu = load_profile(CPU)
    assert cpu.host.cores == "auto"
    assert Profile.from_dict(__import__("tomllib").loads(cpu.to_toml()), source=cpu.source) == cpu
    for bad in ('"many"', "0", "2.5", "true"):
        path = tmp_path / "bad.toml"
        path.write_text(f'[device]\nkind = "cpu"\n[host]\ncores = {bad}\n')
        with pytest.raises(ProfileError) as error:
            Profile.from_file(path)
        assert f'host.cores = {bad}: allowed is a positive number of cores, or "auto"' in str(error.value)


def test_no_miss_reaching_the_tier_is_said_not_left_blank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The audit: with every expert in a device slot (K = E, offloaded) no miss reaches the host tier, whose
    hit rate is then undefined; the headline said "the host tier hits  of those misses"."""
    profile = _profile(tmp_path, GPU_K2.replace("experts_per_layer = 2", "experts_per_layer = 8"))
    out, plan = _plan(monkeypatch, capsys, "-m", str(DEMO), "-p", profile, "--host-memory", "0.003")
    assert plan["expected_hit_rate"] == 1.0 and plan["host_tier"]["hit_rate"] is None
    headline = _line(out, "decode:")
    assert "hits  of" not in headline
    assert "no miss reaches the host tier" in headline


MIXTRAL = ROOT / "tests" / "fixtures" / "mixtral-8x7b-instruct-v0.1"
PROFILES = ROOT / "profiles"


def test_the_headline_is_the_speed_of_the_policy_the_run_uses(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The audit: the headline gave copy-only's 3.04 tok/s while the run (--host-compute auto, the default) is
    hybrid. It gives the run's policy's figure, says which, and --host-compute plans another run."""
    profile = str(PROFILES / "rtx4090-24gb.toml")
    out, plan = _plan(monkeypatch, capsys, "-m", str(MIXTRAL), "-p", profile)
    hybrid, copy_only = plan["speeds"]["tok_s"]["hybrid"], plan["speeds"]["tok_s"]["copy-only"]
    assert plan["host_compute"] == "auto" and plan["run_tok_s"] == hybrid > 3 * copy_only
    headline = _line(out, "decode:")
    assert (
        headline.startswith(f"decode: ~{hybrid:.2f} tok/s hybrid")
        and "--host-compute auto, the default" in headline
    )
    assert f"{copy_only:.2f}" not in headline and "note:" not in out
    out, plan = _plan(monkeypatch, capsys, "-m", str(MIXTRAL), "-p", profile, "--host-compute", "never")
    assert plan["run_tok_s"] == copy_only == plan["tok_s_by_mode"]["never"]
    assert _line(out, "decode:").startswith(
        f"decode: ~{copy_only:.2f} tok/s copying every miss (--host-compute never;"
    )
    out, plan = _plan(monkeypatch, capsys, "-m", str(MIXTRAL), "-p", profile, "--host-compute", "always")
    always = plan["speeds"]["always_tok_s"]
    assert plan["run_tok_s"] == always == plan["tok_s_by_mode"]["always"]
    assert _line(out, "decode:").startswith(f"decode: ~{always:.2f} tok/s with every miss on the host")
    assert f"-> {always:.2f} tok/s" in _line(out, "always (--host-compute always)")


def test_a_profile_that_never_computes_on_the_host_is_planned_copying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    text = (PROFILES / "rtx4090-24gb.toml").read_text().replace("[host]\n", '[host]\ncompute = "never"\n')
    out, plan = _plan(monkeypatch, capsys, "-m", str(MIXTRAL), "-p", _profile(tmp_path, text))
    assert plan["host_compute"] == "never" and plan["run_tok_s"] == plan["speeds"]["tok_s"]["copy-only"]
    assert 'copying every miss (the profile\'s host.compute = "never";' in _line(out, "decode:")
    # and the flag wins over it
    _, plan = _plan(
        monkeypatch, capsys, "-m", str(MIXTRAL), "-p", _profile(tmp_path, text), "--host-compute", "auto"
    )
    assert plan["run_tok_s"] == plan["speeds"]["tok_s"]["hybrid"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--host-compute", "sometimes"), "--host-compute 'sometimes' is not one of auto, never, always"),
        (
            ("-p", CPU, "--host-compute", "never"),
            "--host-compute never: every expert is resident (profile cpu)",
        ),
    ],
)
def test_bad_host_compute_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys, args: tuple, message: str
) -> None:
    code, _, err = run_offload(monkeypatch, capsys, "plan", "-m", str(DEMO), *args)
    assert code != 0 and message in err and "Traceback" not in err


def test_a_mode_predicted_faster_than_the_runs_is_said(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The audit: Mixtral on laptop-8gb with 8 GiB of RAM, where the README's chat command runs the default
    (hybrid): the tier's builds of its reads for the host make hybrid (0.46 tok/s) slower than copy-only (0.68)."""
    args = ("-m", str(MIXTRAL), "-p", str(PROFILES / "laptop-8gb.toml"), "--host-memory", "8")
    out, plan = _plan(monkeypatch, capsys, *args)
    by_mode = plan["tok_s_by_mode"]
    assert by_mode["never"] == plan["tok_s_with_disk"]["copy-only"] > by_mode["auto"] == plan["run_tok_s"]
    note = _line(out, "note:")
    assert (
        f"--host-compute never is predicted faster here: copy-only {by_mode['never']:.2f} against hybrid "
        in note
    )
    assert f"{by_mode['auto']:.2f} tok/s" in note and "converts each read" in note
    out, _ = _plan(monkeypatch, capsys, *args, "--host-compute", "never")
    assert "note:" not in out
