"""toolkit.core.upstream_noise: only the listed upstream messages are dropped, and they still exist upstream."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from toolkit.core import upstream_noise


def _source(package: str, relative: str) -> str:
    """An installed package's file, read without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed")
    return (Path(next(iter(spec.submodule_search_locations))) / relative).read_text()


def test_the_dropped_texts_are_still_what_upstream_says():
    # Fails when an upstream rewords a message: the entry is stale and should go.
    assert upstream_noise.LOGGED["bitsandbytes.backends.cpu.ops"] in _source("bitsandbytes", "backends/cpu/ops.py")
    assert upstream_noise.LOGGED["transformers.tokenization_utils_tokenizers"] in \
        _source("transformers", "tokenization_utils_tokenizers.py")
    assert "`is_gradient_checkpointing` is deprecated" in _source("transformers", "modeling_utils.py")
    assert "is_gradient_checkpointing" in _source("trl", "models/utils.py")


def test_install_drops_only_the_listed_log_record_and_is_idempotent():
    name = "bitsandbytes.backends.cpu.ops"
    logger = logging.getLogger(name)
    before = list(logger.filters)  # an earlier test's `toolkit.cli.main` may have installed it already
    logger.filters[:] = [f for f in before if not isinstance(f, upstream_noise._Drop)]
    try:
        upstream_noise.install()
        upstream_noise.install()
        assert sum(isinstance(f, upstream_noise._Drop) for f in logger.filters) == 1

        def passes(msg):
            record = logger.makeRecord(name, logging.WARNING, __file__, 1, msg, ("x",), None)
            return all(f.filter(record) for f in logger.filters)

        assert not passes("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...")
        assert passes("Something else went wrong: %s")
    finally:
        logger.filters[:] = before


def test_install_ignores_only_the_listed_warning():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        upstream_noise.install()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`something_else` is deprecated", FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated", UserWarning)
    assert [str(w.message) for w in seen] == ["`something_else` is deprecated",
                                              "`is_gradient_checkpointing` is deprecated"]


def test_importing_peft_after_install_prints_no_kernels_message():
    code = "from toolkit.core import upstream_noise; {}import peft"
    run = lambda setup: subprocess.run([sys.executable, "-c", code.format(setup)],  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    quieted = run("upstream_noise.install(); ")
    assert quieted.returncode == 0, quieted.stderr
    assert "gemm_4bit_forward" not in quieted.stderr
    from toolkit.core import capability

    if "avx512_bf16" in capability.detect("cpu").flags:  # where bitsandbytes tries to fetch that kernel
        assert "Failed to load CPU gemm_4bit_forward" in run("").stderr


def test_decoding_with_metas_llama32_tokenizer_after_install_logs_no_cleanup_advice(llama32_tokenizer_dir):
    code = ("from toolkit.core import upstream_noise; {}from transformers import AutoTokenizer; "
            f"t = AutoTokenizer.from_pretrained({str(llama32_tokenizer_dir)!r}); print(t.decode(t.encode('Hi , there .')))")
    run = lambda setup: subprocess.run([sys.executable, "-c", code.format(setup)],  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    quieted, plain = run("upstream_noise.install(); "), run("")
    assert quieted.returncode == 0, quieted.stderr
    assert "Hi , there ." in quieted.stdout  # the spaces kept: transformers skips the cleanup either way
    assert "clean_up_tokenization_spaces" not in quieted.stderr
    assert "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer" in plain.stderr  # what it drops
