"""The ``transport`` config section: codec chains canonicalised, old keys and bad codecs as one-line errors."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.transport.wire import config_from_json, config_to_json


def test_chains_are_stored_canonically_from_strings_lists_and_split_yaml_lists() -> None:
    for spec in ("topk(frac=0.01)+qsgd(bits=8, block=256)", ["topk(frac=0.01)", "qsgd(bits=8, block=256)"],
                 "[topk(frac=0.01), qsgd(bits=8, block=256)]"):
        cfg = config_from_dict({"engine": {"kind": "ray"}, "transport": {"comm": spec, "error_feedback": True}})
        assert cfg.transport.comm == "topk(frac=0.01)+qsgd(bits=8,block=256)"
    cfg = config_from_dict({}, ["transport.codec=[topk(frac=0.01), qsgd(bits=8, block=256)]",
                                "transport.downlink={kind: delta, codec: [sign]}"])
    assert cfg.transport.codec == ["topk(frac=0.01)", "qsgd(bits=8,block=256)"]
    assert cfg.transport.downlink.codec == ["sign"]
    assert config_from_json(config_to_json(cfg)) == cfg
    assert config_from_dict({"engine": {"kind": "ray"}, "transport": {"comm": "powersgd(4)"}}).transport.comm \
        == "powersgd(4)"


@pytest.mark.parametrize(("overrides", "needle"), [
    (["engine.kind=flower", "engine.transport_dtype=bf16"], "engine.transport_dtype: moved to transport.dtype"),
    (["engine.kind=ray", "engine.comm=fp16"], "engine.comm: moved to transport.comm"),
    (["engine.kind=ray", "transport.comm=zip(3)"], "transport.comm: unknown codec 'zip'"),
    (["engine.kind=ray", "transport.comm=qsgd(bitz=4)"], "transport.comm: qsgd: unknown parameter 'bitz'"),
    (["engine.kind=ray", "transport.comm=powersgd(0)"], "transport.comm: powersgd needs a rank >= 1"),
    (["transport.codec=topk(frac=2)"], "transport.codec: topk: frac must be in (0, 1]"),
    (["transport.downlink.codec=[sign, topk(k=3)]"], "transport.downlink.codec: codec chain: sign leaves no values"),
    (["engine.kind=ray", "transport.codec=sign"], "transport.codec: the ray engine encodes gradients with "
                                                  "transport.comm"),
    (["engine.kind=ray", "transport.error_feedback=true"], "transport.error_feedback: applies to library codecs"),
    (["engine.kind=flower", "transport.error_feedback=true"], "transport.error_feedback: applies only with a "
                                                              "transport.codec chain"),
    (["engine.kind=flower", "transport.downlink.kind=delta"], "transport.downlink.kind: delta needs a "
                                                              "transport.codec chain"),
    (["engine.kind=flower", "transport.codec=sign", "transport.downlink={kind: delta, error_feedback: false}"],
     "transport.downlink.error_feedback: the delta downlink always carries"),
    (["engine.kind=flower", "engine.strategy=fedmedian", "transport.codec=topk(frac=0.01)"],
     "engine.strategy fedmedian aggregates coordinate-wise and cannot take sparse updates"),
    (["engine.kind=ray", "transport.comm=sign", "transport.residual_decay=0.5"],
     "transport.residual_decay: applies only with transport.error_feedback"),
    (["engine.kind=ray", "compression={kind: expand, mode: explicit}"],
     "transport.expand_sync: compact needs compression.mode: fused"),
    (["engine.kind=ray", "compression={kind: expand}", "transport.comm=powersgd(2)"],
     "transport.expand_sync: compact does not support comm 'powersgd(2)'"),
    (["engine.kind=flower", "transport.expand_sync=factors"], "transport.expand_sync: used by the ray engine only"),
])
def test_transport_mistakes_are_one_line_config_errors(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["transport.comm=zip(3)", "transport.comm=topk(fraction=0.1)",
                                      "engine.comm=fp16"])
def test_cli_run_exits_2_with_one_line(override: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["run", "--set", "engine.kind=ray", "--set", override])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("compactfl: ") and "\n" not in err and "transport.comm" in err
