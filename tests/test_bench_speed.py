"""``llnode bench speed`` end to end on a tiny model: a worker per precision, quality, the JSON line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llnode.bench.speed import choose_default, parse_shard_sets, parse_variants
from llnode.cli import main


def test_default_is_the_smallest_set_among_the_fastest_within_the_quality_limits() -> None:
    ms = {"fp32": 40.0, "int8": 20.0, "int4": 15.0}
    size = {"fp32": 621.0, "int8": 172.0, "int4": 134.0}
    good = {"ppl_ratio": 1.01, "top1_agreement": 0.97}
    assert choose_default(ms, {p: good for p in ms}, size) == "int4"
    bad4 = {**{p: good for p in ms}, "int4": {"ppl_ratio": 1.07, "top1_agreement": 0.84}}
    assert choose_default(ms, bad4, size) == "int8"
    none = {p: {"ppl_ratio": 2.0, "top1_agreement": 0.1} for p in ms}
    assert choose_default(ms, none, size) == "fp32"
    # within 10 % of the fastest counts as a tie, won by the smaller set (a quiet run: 15.7 vs 14.9 ms)
    close = {"fp32": 32.4, "int8": 14.94, "int4": 15.72}
    assert choose_default(close, {p: good for p in ms}, size) == "int4"
    # beyond the tie the faster one wins, whatever its size
    far = {"fp32": 32.4, "int8": 12.0, "int4": 15.72}
    assert choose_default(far, {p: good for p in ms}, size) == "int8"
    # without sizes: the fastest of the tied
    assert choose_default(close, {p: good for p in ms}) == "int8"


def test_bench_speed_json(
    tiny_model_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LLNODE_CACHE", str(tmp_path))
    args = ["bench", "speed", "--model", str(tiny_model_dirs["llama"]), "--json"]
    args += ["--rounds", "1", "--steps", "2", "--threads", "1", "--contexts", "4,40"]
    args += ["--variant", "nomap:LLNODE_MAP_WEIGHTS=0", "--profile"]
    # The int4 set measured a second time as another shard set (it exists once the precisions are prepared).
    args += ["--shard-set", f"again={tmp_path / 'test-shards' / 'llama-int4'}"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["decode_ms"]) == {"fp32", "int8", "int4"}
    assert all(v > 0 for v in out["decode_ms_all"].values())
    assert len(out["decode_ms_all"]) == 10  # 3 precisions, the variant and the shard set, at 2 contexts
    assert out["default_precision"] in out["decode_ms"]
    assert out["quality"]["fp32"]["ppl_ratio"] == 1.0 and out["quality"]["fp32"]["kl"] == 0.0
    assert 0.0 < out["quality"]["int8"]["top1_agreement"] <= 1.0
    assert out["rss_over_shard_bytes"] > 1.0  # a process holds more than its shard bytes
    base, load, peak = (out[k]["int4/1t"] for k in ("baseline_rss_mib", "load_peak_rss_mib", "peak_rss_mib"))
    assert 10 < base < load <= peak  # the interpreter alone, then the sessions, then the workload on top
    assert 0 < out["rss_above_baseline_over_shard_bytes"] < out["rss_over_shard_bytes"]
    assert (tmp_path / "test-shards" / "llama-int4" / "manifest.json").is_file()
    # the breakdown: tokenizer, then the sessions (anonymous + file pages) add up to the RSS after loading
    parts = out["sessions_mib"]["int4/1t"]
    assert parts["anon"] > 0 and parts["file"] >= 0
    assert base + out["tokenizer_mib"]["int4/1t"] + parts["anon"] + parts["file"] <= load + 0.3
    assert out["kv_mib"]["int4/1t"] > 0 and out["workload_peak_rss_mib"]["int4/1t"] > 0
    assert out["peak_rss_mib"]["int4/1t"] == max(load, out["workload_peak_rss_mib"]["int4/1t"])
    variant = out["variants"]["int4+nomap"]
    assert variant["env"] == {"LLNODE_MAP_WEIGHTS": "0"} and variant["decode_ms"] > 0
    assert "int4+nomap" not in out["decode_ms"]  # variants never compete for the default
    again = out["shard_sets"]["again"]
    assert (
        again["base"] == "int4"
        and again["decode_ms"] > 0
        and set(again["over_base"]) == {"1t/ctx4", "1t/ctx40"}
    )
    assert "again" not in out["decode_ms"]  # nor do other shard sets
    assert out["quality"]["again"] == out["quality"]["int4"]  # the same graphs give the same numbers
    # the profile: shares of real operators that add up to the whole kernel time, inside the runs' time
    prof = out["op_profile"]["int4/1t"]
    assert "MatMulNBits" in prof["ops"] and abs(sum(prof["ops"].values()) - 1.0) < 0.01
    assert 0.0 < prof["kernel_over_run"] <= 1.0


def test_variants_parse_or_say_what_is_wrong() -> None:
    assert parse_variants(["nomap:LLNODE_MAP_WEIGHTS=0", "thp:A=1,B=x=y"]) == {
        "nomap": {"LLNODE_MAP_WEIGHTS": "0"},
        "thp": {"A": "1", "B": "x=y"},
    }
    for bad in (["nomap"], [":A=1"], ["x:A"], ["x:A=1,B"], ["x:A=1", "x:B=2"]):
        with pytest.raises(ValueError, match="NAME:VAR=VALUE"):
            parse_variants(bad)


def test_shard_sets_parse_or_say_what_is_wrong(tiny_llama_shards: Path, tmp_path: Path) -> None:
    assert parse_shard_sets([f"old={tiny_llama_shards}"], reserved=["int4"]) == {"old": tiny_llama_shards}
    for bad in ("old", f"={tiny_llama_shards}", f"int4={tiny_llama_shards}"):
        with pytest.raises(ValueError, match="NAME=DIR"):
            parse_shard_sets([bad], reserved=["int4"])
    with pytest.raises(ValueError, match="--shard-set old"):
        parse_shard_sets([f"old={tmp_path}"], reserved=[])  # no manifest there
