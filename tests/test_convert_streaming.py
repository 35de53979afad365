"""`offload convert` streams module by module: no layer's output is ever held whole (issue 17's real-size convert)."""

from __future__ import annotations

import weakref
from pathlib import Path

import offload.checkpoint.convert as convert
from offload.checkpoint.weights import converted_names
from offload.quant.scheme import QuantScheme
from tests.baby import BabySpec, write_baby


def test_each_module_is_dropped_before_the_next_is_quantized(tmp_path: Path, monkeypatch) -> None:
    write_baby(BabySpec("stream", hidden_size=64, intermediate_size=128), tmp_path / "float")
    real = convert._convert_unit
    earlier: list[weakref.ref] = []
    held: list[str] = []

    def watched(reader, unit, builder):
        held.extend(unit.name for ref in earlier if ref() is not None)
        stored = real(reader, unit, builder)
        earlier.extend(weakref.ref(tensor) for tensor in stored.values())
        return stored

    monkeypatch.setattr(convert, "_convert_unit", watched)
    scheme = QuantScheme.build(2, attention="hqq:4:64", experts="hqq:4:64")
    convert.convert_checkpoint(tmp_path / "float", tmp_path / "out", scheme)
    assert held == []  # no module's tensors were still alive when the next module was quantized
    # and the streamed shards hold every tensor
    from offload.checkpoint.reader import Checkpoint

    out = Checkpoint(tmp_path / "out")
    assert out.names() == set(converted_names(out.config, scheme))
    assert not list((tmp_path / "out").glob("*.data"))
