"""`offload bench`: the report's schema and sane values, and the ablation's variants giving the resident tokens.

No timing is asserted: speeds only have to be positive numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from offload.bench.ablation import VARIANTS, build_source
from offload.bench.prompt import bench_prompt
from offload.bench.run import BenchError, run_bench
from offload.experts.cache import ExpertCache
from offload.hybrid import build_host_path
from offload.loading import OffloadOptions, attach_source, load_model
from offload.quant.codec import codec_for
from offload.settings.flags import FIELDS, LoadFlags
from tests.baby import BabySpec, write_baby

FAST_LINK = "emulated:50"  # an emulated link, so copies really overlap, but fast enough for a test


@pytest.fixture(scope="module")
def bench_baby(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small baby with no tokenizer: the bench prompts it with seeded random ids."""
    directory = tmp_path_factory.mktemp("bench-baby")
    write_baby(BabySpec("bench-baby", hidden_size=32, intermediate_size=48, num_hidden_layers=3), directory)
    return directory


def bench_app() -> typer.Typer:
    """`bench` on an app of its own, as cli.main registers it."""
    from cli import bench_cmd

    app = typer.Typer()
    app.callback()(lambda: None)
    bench_cmd.register(app)
    return app


def unit_interval(value: float | None) -> bool:
    return value is None or 0.0 <= value <= 1.0


def test_ablate_json_has_every_row_with_identical_tokens(bench_baby: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        bench_app(),
        ["bench", "--model", str(bench_baby), "--dtype", "float32", "--ablate", "--prompt-tokens", "12",
         "--new-tokens", "6", "--runs", "2", "--link", FAST_LINK, "--json", str(out)],
        env={"COLUMNS": "80"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "no-prefetch" in result.output  # the table
    report = json.loads(out.read_text())
    assert report["format"] == "offload-bench" and report["version"] == 1
    assert [row["name"] for row in report["rows"]] == list(VARIANTS)
    assert report["experts_per_layer"] == 4  # half the experts by default
    assert report["identical_tokens"] is True
    assert len({tuple(row["tokens"]) for row in report["rows"]}) == 1
    assert len(report["rows"][0]["tokens"]) == 6
    rows = {row["name"]: row for row in report["rows"]}
    for row in rows.values():
        assert row["decode_tokens_per_second"] > 0 and row["prefill_tokens_per_second"] > 0
        assert row["ttft_seconds"] > 0 and len(row["decode_tokens_per_second_runs"]) == 2
        for phase in ("prefill", "decode"):
            figures = row[phase]
            assert unit_interval(figures["hit_rate"])
            assert unit_interval(figures["prefetch_recall"]) and unit_interval(figures["prefetch_precision"])
            if row["name"] == "host-experts":  # no device cache: neither hits nor misses, and no hit rate
                assert figures["hits"] == figures["misses"] == 0 and figures["hit_rate"] is None
            else:
                assert figures["hits"] + figures["misses"] == figures["accesses"]
        memory = row["memory"]
        assert memory["device"]["total_bytes"] == sum(
            memory["device"][key] for key in ("dense_bytes", "expert_bytes", "kv_bytes")
        )
    assert rows["full"]["ratio_to_full"] == 1.0
    assert rows["resident"]["decode"]["bytes_moved"] == 0
    assert rows["resident"]["memory"]["host"]["store_bytes"] == 0
    assert rows["full"]["decode"]["bytes_moved"] > 0  # K = 4 < E = 8
    assert rows["full"]["decode"]["prefetch_recall"] is not None
    assert (
        rows["copy-only"]["decode"]["bytes_moved"] > 0 and rows["copy-only"]["decode"]["host_computes"] == 0
    )
    assert rows["no-prefetch"]["decode"]["prefetch_loads"] == 0
    host_row = rows["host-experts"]  # every expert on the host: nothing cached, nothing moved
    assert host_row["decode"]["host_computes"] == host_row["decode"]["accesses"] > 0
    assert host_row["decode"]["bytes_moved"] == 0 and host_row["memory"]["device"]["expert_bytes"] == 0
    assert host_row["experts_per_layer"] == 0
    for cold in ("no-cache", "naive"):  # nothing survives from one token to the next
        assert rows[cold]["decode"]["hit_rate"] == 0.0
        assert rows[cold]["decode"]["loads"] == rows[cold]["decode"]["accesses"]
    assert rows["naive"]["experts_per_layer"] == 1
    assert (
        rows["naive"]["memory"]["device"]["expert_bytes"] * 4
        == rows["full"]["memory"]["device"]["expert_bytes"]
    )
    check = report["policy_check"]
    assert check["tokens"] == rows["resident"]["tokens"]
    replayed = check["decode"]["replay_bytes"]
    assert replayed["belady"] <= replayed["lru"]  # Belady is the fewest loads a demand policy can make
    assert check["whole"]["replay_bytes"]["belady"] <= check["whole"]["measured_bytes"]


def test_k_equal_to_experts_moves_nothing_once_warm(bench_baby: Path) -> None:
    report = run_bench(
        bench_baby,
        LoadFlags(dtype="float32", experts_per_layer=8, link=FAST_LINK),
        prompt_tokens=10,
        new_tokens=5,
        runs=2,
    ).as_dict()
    (row,) = report["rows"]
    assert row["name"] == "offloaded" and row["experts_per_layer"] == 8
    assert row["prefill"]["bytes_moved"] == 0 and row["decode"]["bytes_moved"] == 0  # the warm-up loaded all
    assert row["decode"]["hit_rate"] == 1.0 and row["decode"]["bytes_moved_per_token"] == 0


def test_k_below_experts_moves_bytes_every_token(bench_baby: Path) -> None:
    report = run_bench(
        bench_baby,
        LoadFlags(dtype="float32", experts_per_layer="2", prefetch=1, link=FAST_LINK),
        prompt_tokens=10,
        new_tokens=8,
        runs=1,
    ).as_dict()
    (row,) = report["rows"]
    decode = row["decode"]
    assert decode["bytes_moved"] > 0 and decode["bytes_moved_per_token"] > 0
    assert decode["bytes_moved"] == decode["loads"] * report["link"]["expert_bytes"]
    assert unit_interval(decode["hit_rate"]) and unit_interval(decode["prefetch_recall"])
    assert decode["prefetch_recall"] is not None  # one guess per layer after the first
    assert row["memory"]["host"]["store_bytes"] == 3 * 8 * report["link"]["expert_bytes"]


def test_copy_ratio_sizes_the_link_from_the_resident_row(bench_baby: Path) -> None:
    report = run_bench(
        bench_baby,
        LoadFlags(dtype="float32", experts_per_layer=4),
        copy_ratio=5.0,
        prompt_tokens=6,
        new_tokens=4,
        runs=1,
    ).as_dict()
    assert [row["name"] for row in report["rows"]] == ["resident", "offloaded"]
    link = report["link"]
    assert link["spec"].startswith("emulated:") and link["gbps"] > 0 and link["layer_seconds"] > 0
    assert link["expert_copy_seconds"] == pytest.approx(5.0 * link["layer_seconds"])
    assert report["rows"][0]["tokens"] == report["rows"][1]["tokens"]


def test_ablation_can_measure_a_subset_of_rows(bench_baby: Path) -> None:
    report = run_bench(
        bench_baby,
        LoadFlags(dtype="float32", experts_per_layer=2, link=FAST_LINK, threads=1),
        ablate=True,
        variants=("naive", "full"),
        prompt_tokens=5,
        new_tokens=3,
        runs=1,
    ).as_dict()
    assert [row["name"] for row in report["rows"]] == ["full", "naive"]  # always in the ablation's order
    assert report["machine"]["torch_threads"] == 1
    assert report["policy_check"]["experts_per_layer"] == 2
    assert report["cache_policy"] == report["policy_check"]["cache_policy"] == "lrfu"  # the default


def test_the_cache_policy_flag_reaches_the_rows_and_the_policy_check(bench_baby: Path) -> None:
    report = run_bench(
        bench_baby,
        LoadFlags(dtype="float32", experts_per_layer=3, cache_policy="lru", link=FAST_LINK, threads=1),
        ablate=True,
        variants=("full", "no-prefetch"),
        prompt_tokens=1,
        new_tokens=12,
        runs=1,
    ).as_dict()
    assert report["cache_policy"] == report["policy_check"]["cache_policy"] == "lru"
    assert all(row["description"].startswith("LRU cache") for row in report["rows"])
    # With no step needing more than K experts (a one-token prompt), the measured bytes are those of
    # LRU + prefetch replayed on the same routing.
    check = report["policy_check"]["whole"]
    assert check["measured_bytes"] == check["replay_bytes"]["lru+prefetch"]
    assert check["replay_bytes"]["lrfu+prefetch"] != check["replay_bytes"]["lru+prefetch"]  # tells them apart


def test_resident_settings_measure_one_resident_row(bench_baby: Path) -> None:
    report = run_bench(
        bench_baby, LoadFlags(dtype="float32"), prompt_tokens=4, new_tokens=3, runs=1
    ).as_dict()
    (row,) = report["rows"]
    assert row["name"] == "resident" and row["experts_per_layer"] is None
    assert row["decode"]["accesses"] == 0 and row["decode"]["hit_rate"] is None


@pytest.mark.parametrize("experts_per_layer", [1, 3])
@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_every_variant_gives_resident_logits_bit_for_bit(
    bench_baby: Path, variant: str, experts_per_layer: int
) -> None:
    """A prefill needing more experts than slots, then decode steps: each variant equals resident exactly."""
    from offload.experts.link import EmulatedLink

    model = load_model(bench_baby, dtype="float32", offload=OffloadOptions(experts_per_layer=1, prefetch=0))
    store = model.expert_source.cache.store
    ids = torch.tensor([[1, 17, 5, 99, 23, 64, 8, 100, 3]])

    def logits_of(source: object) -> list[torch.Tensor]:
        from offload.kv_cache import KVCache

        attach_source(model, source)
        cache = KVCache(model.config, 16, dtype=model.dtype, device=model.device)
        with torch.inference_mode():
            outputs = [model(ids, cache)]
            for token in (7, 42, 7, 11):
                outputs.append(model(torch.tensor([[token]]), cache))
        return outputs

    expected = logits_of(build_source("resident", model, store, None, experts_per_layer, 0))
    with EmulatedLink(50.0) as link:
        codecs = [codec_for(model.quant_scheme.expert_spec(layer)) for layer in range(store.num_layers)]
        host = build_host_path(
            store, codecs, link, dtype=model.dtype, device=model.device, hidden_size=32, mode="always"
        )
        got = logits_of(build_source(variant, model, store, link, experts_per_layer, 2, host=host))
    for want, have in zip(expected, got, strict=True):
        assert torch.equal(want, have)


def test_flush_empties_a_layer_and_counts_unused_prefetches(bench_baby: Path) -> None:
    from offload.bench.ablation import materializers
    from offload.experts.link import LocalLink

    model = load_model(bench_baby, dtype="float32", offload=OffloadOptions(experts_per_layer=1, prefetch=0))
    store = model.expert_source.cache.store
    cache = ExpertCache(store, 2, LocalLink(), materializers(model))
    cache.load(0, 3)
    cache.load(0, 5, prefetch=True)
    cache.acquire(0, 3)
    cache.load(1, 2)
    cache.flush(0)
    assert cache.resident(0) == [] and cache.resident(1) == [2]
    assert cache.stats.layers[0].wasted_prefetches == 1
    assert cache.load(0, 3)  # the slots are free again


def test_prompt_is_held_out_text_with_a_tokenizer_else_seeded_ids(tmp_path: Path) -> None:
    import mistral_common

    shutil.copy(
        Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", tmp_path / "tokenizer.model"
    )
    ids, source = bench_prompt(tmp_path, 32000, 40)
    assert len(ids) == 40 and ids[0] == 1 and "text" in source
    assert bench_prompt(tmp_path, 32000, 40)[0] == ids
    long_ids, _ = bench_prompt(tmp_path, 32000, 3000)  # longer than the text: it repeats
    assert len(long_ids) == 3000 and long_ids[:40] == ids
    random_ids, source = bench_prompt(tmp_path / "nothing", 100, 20)
    assert len(random_ids) == 20 and random_ids[0] == 1 and "random" in source
    assert all(3 <= i < 100 for i in random_ids[1:])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"new_tokens": 1}, "--new-tokens"),
        ({"runs": 0}, "--runs"),
        ({"prompt_tokens": 0}, "--prompt-tokens"),
        ({"copy_ratio": 5.0, "link": "emulated:3"}, "either --copy-ratio"),
        ({"copy_ratio": -1.0}, "--copy-ratio"),
        ({"copy_ratio": 5.0}, "offload them"),  # every expert resident: no link to size
        ({"prompt_tokens": 500, "new_tokens": 100}, "context"),
        ({"ablate": True, "variants": ("full", "bogus")}, "bogus"),
        ({"threads": 0}, "--threads"),
    ],
)
def test_bad_settings_are_clear_errors(bench_baby: Path, changes: dict, message: str) -> None:
    from offload.errors import OffloadError

    settings = {"dtype": "float32", "prompt_tokens": 4, "new_tokens": 3, "runs": 1, **changes}
    flags = LoadFlags(**{name: settings.pop(name) for name in FIELDS if name in settings})
    with pytest.raises(OffloadError, match=message):
        run_bench(bench_baby, flags, **settings)
    assert issubclass(BenchError, OffloadError)


def test_host_ratio_emulates_the_host_and_full_computes_misses_there(bench_baby: Path) -> None:
    """One expert copy costs 5 layers, a host expert 10 device experts: a layer holds at least two device
    experts, so the host is always the cheaper way for a miss at one token, and full takes it."""
    report = run_bench(
        bench_baby,
        LoadFlags(dtype="float32", host_ratio=10.0),
        copy_ratio=5.0,
        prompt_tokens=6,
        new_tokens=4,
        runs=1,
        ablate=True,
        variants=("resident", "full", "copy-only", "host-experts"),
    ).as_dict()
    host = report["host"]
    assert host["host_ratio"] == 10.0 and "emulated host" in host["host"]
    assert host["host_expert_seconds"]["1"] == pytest.approx(10 * host["device_expert_seconds"]["1"])
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["full"]["decode"]["host_computes"] > 0
    assert rows["copy-only"]["decode"]["host_computes"] == 0
    assert report["identical_tokens"] and len({tuple(row["tokens"]) for row in rows.values()}) == 1


def test_host_compute_never_makes_full_the_copy_only_engine(bench_baby: Path) -> None:
    report = run_bench(
        bench_baby,
        LoadFlags(dtype="float32", host_ratio=10.0, host_compute="never", link=FAST_LINK),
        prompt_tokens=6,
        new_tokens=3,
        runs=1,
        ablate=True,
        variants=("full",),
    ).as_dict()
    assert report["host"] is None
    assert report["rows"][0]["decode"]["host_computes"] == 0
