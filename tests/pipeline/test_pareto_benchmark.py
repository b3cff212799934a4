"""The accuracy-for-bytes benchmark's bookkeeping: the multi-seed table (paired change vs dense, compression
against dense fp32's upload) and the dropout row's spec; the trainings themselves run the real ServerApp."""

from __future__ import annotations

import pytest

from benchmarks.federated_pareto import DENSE, parse_dropout, table


def _run(acc: float, upload: float, seconds: float = 10.0) -> dict:
    return {"summary": {"test_accuracy": acc, "upload_bytes_per_client_round": upload, "strategy": "fedavg",
                        "transport_codec": "none", "transport_dtype": "fp32", "bytes_total": 10 * upload},
            "seconds": seconds, "screen": " + clip 1.5x median"}


def test_table_pairs_seeds_with_dense_and_compares_uploads_with_dense_fp32() -> None:
    results = {DENSE: {0: _run(0.60, 1000.0), 1: _run(0.58, 1000.0)},
               "small": {0: _run(0.59, 10.0), 1: _run(0.56, 10.0)},
               "one_seed": {1: _run(0.50, 500.0)}}
    rows = {line.split(" | ")[0].strip("| "): line for line in table(results).splitlines()[2:]}
    assert " | 100.0x | " in rows["small"] and " | 2.0x | " in rows["one_seed"]
    assert " | 0.5750 | -1.5 | " in rows["small"]  # mean of (0.59 - 0.60, 0.56 - 0.58), not of unpaired means
    assert " | -8.0 | " in rows["one_seed"]  # only seed 1 is paired
    assert "0.5900 (s0) / 0.5600 (s1)" in rows["small"]


def test_dropout_spec_is_parsed_or_refused_in_one_line() -> None:
    stem, client = parse_dropout("smallnet7_dense:3:6-10")
    assert (stem, client.partition, client.first, client.last) == ("smallnet7_dense", 3, 6, 10)
    with pytest.raises(SystemExit, match="STEM:PARTITION:FIRST-LAST"):
        parse_dropout("smallnet7_dense:3")
