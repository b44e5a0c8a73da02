"""SSFN: pair sets, the fusion block against nn.MultiheadAttention in both attention modes, batch (in)dependence,
the encoders and the Hugging Face adapter, the FSDD reader and log-mel features, the task loaders on the real
files, and a short sweep of each task end to end."""

import json
import math
import os
import sys
import types
import wave

import numpy as np
import pytest
import torch

import stepfusion_kernels
from stepfusion_kernels import skew_pairs
from stepfusion_kernels import train as cli
from stepfusion_kernels.data import data_root, fsdd
from stepfusion_kernels.models import SSFN, HuggingFaceLayerStack, LayerStackEncoder, SkewPairFusionBlock
from stepfusion_kernels.models.ssfn import first_token
from stepfusion_kernels.tasks import ssfn as tasks

DATA = data_root()
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"shared data directory {DATA} is absent")
BACKENDS = [b for b in ("reference", "cpu") if b in stepfusion_kernels.backends()]


def test_pair_sets_for_late_pairwise_and_skew():
    assert skew_pairs(0, 1, 12, 12).tolist() == [[11, 11]]                       # late fusion
    assert skew_pairs(0, 12, 12, 12).tolist() == [[11 - k, 11 - k] for k in range(12)]   # pairwise
    assert skew_pairs(3, 2, 12, 12).tolist() == [[11, 8], [10, 7]]             # A's last layer, B's 9th
    assert skew_pairs(-3, 2, 12, 12).tolist() == [[8, 11], [7, 10]]
    model = SSFN(16, 2, 32, 10, skew=-11, num_pairs=1)
    assert model.pairs.tolist() == [[0, 11]]
    assert SSFN(16, 2, 32, 10, pairs=[[4, 2], [4, 2]]).pairs.tolist() == [[4, 2], [4, 2]]
    with pytest.raises(ValueError, match="either pairs or skew"):
        SSFN(16, 2, 32, 10, pairs=[[0, 0]], skew=1)
    with pytest.raises(ValueError, match="leave the stacks"):
        SSFN(16, 2, 32, 10, skew=10, num_pairs=3)
    args = types.SimpleNamespace(sweep=True, skews=None, sparsity=[1, 3, 5], skew=0, num_pairs=1)
    sets = tasks.pair_sets(args, 12)
    # D pairs of skew d fit while |d| + D <= 12: 23 + 19 + 15 sweep cells and the two baselines.
    assert len(sets) == 23 + 19 + 15 + 2
    assert "d=8, D=5" not in sets and sets["d=7, D=5"][2].tolist()[-1] == [7, 0]
    assert sets["pairwise fusion"][2].shape == (12, 2) and sets["late fusion"][2].tolist() == [[11, 11]]
    with pytest.raises(ValueError, match="leave the 12-layer stacks"):
        tasks.pair_sets(types.SimpleNamespace(sweep=False, skew=9, num_pairs=4), 12)


def _reference_block(block, ha, hb, pairs, sample_mode):
    """The block's math with nn.MultiheadAttention holding the block's own weights, one pair at a time."""
    dim, heads = block.dim, block.heads
    attention = torch.nn.MultiheadAttention(dim, heads, batch_first=True, dtype=ha.dtype)
    with torch.no_grad():
        attention.in_proj_weight.copy_(block.qkv.weight_a)
        attention.in_proj_bias.copy_(block.qkv.bias_a)
        attention.out_proj.weight.copy_(block.out_proj.weight)
        attention.out_proj.bias.copy_(block.out_proj.bias)

    def update(a, b):
        x = block.norm1(a + attention(a, b, b, need_weights=False)[0])
        return block.norm2(x + block.ffn(x))

    fused = []
    for i, j in pairs.tolist():
        a, b = ha[i], hb[j]
        if sample_mode:       # (N, T, dim): every sample its own sequence, then the mean over tokens
            x, y = update(a, b).mean(dim=1), update(b, a).mean(dim=1)
        else:                 # (N, dim): the batch is one sequence
            x, y = update(a[None], b[None])[0], update(b[None], a[None])[0]
        fused.append((x + y) / 2)
    return torch.stack(fused)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attention", ["batch", "sample"])
def test_fusion_block_is_the_papers_block_with_shared_weights(attention, backend):
    torch.manual_seed(0)
    block = SkewPairFusionBlock(16, 4, 24, attention=attention, backend=backend).double().eval()
    pairs = torch.tensor([[5, 3], [4, 2], [5, 3], [0, 5]])
    if attention == "batch":
        ha, hb = torch.randn(6, 9, 16, dtype=torch.float64), torch.randn(6, 9, 16, dtype=torch.float64)
    else:
        ha, hb = torch.randn(6, 9, 7, 16, dtype=torch.float64), torch.randn(6, 9, 3, 16, dtype=torch.float64)
    fused = block(ha, hb, pairs)
    assert fused.shape == (4, 9, 16)
    torch.testing.assert_close(fused, _reference_block(block, ha, hb, pairs, attention == "sample"))
    fused.sum().backward()
    assert block.qkv.weight_a.grad.abs().sum() > 0 and block.out_proj.weight.grad.abs().sum() > 0


def test_sample_mode_takes_one_vector_per_sample_as_a_single_token():
    torch.manual_seed(1)
    block = SkewPairFusionBlock(8, 2, 16, attention="sample").eval()
    ha, hb, pairs = torch.randn(3, 5, 8), torch.randn(3, 5, 8), torch.tensor([[2, 1]])
    torch.testing.assert_close(block(ha, hb, pairs), block(ha.unsqueeze(2), hb.unsqueeze(2), pairs))
    with pytest.raises(ValueError, match=r"ha must be \(L, N, dim\)"):
        SkewPairFusionBlock(8, 2, 16, attention="batch")(ha.unsqueeze(2), hb, pairs)
    with pytest.raises(ValueError, match="attention must be one of"):
        SkewPairFusionBlock(8, 2, 16, attention="tokens")


@pytest.mark.parametrize("attention", ["batch", "sample"])
def test_a_prediction_depends_on_its_batch_in_batch_mode_only(attention):
    torch.manual_seed(2)
    model = SSFN(16, 2, 32, 5, skew=2, num_pairs=2, layers=(4, 4), attention=attention).eval()
    shape = (4, 6, 16) if attention == "batch" else (4, 6, 3, 16)
    ha, hb = torch.randn(shape), torch.randn(shape)
    logits = model(ha, hb)
    assert logits.shape == (6, 5)
    others_changed = model(torch.cat([ha[:, :1], torch.randn_like(ha[:, 1:])], 1),
                           torch.cat([hb[:, :1], torch.randn_like(hb[:, 1:])], 1))
    alone = model(ha[:, :1], hb[:, :1])
    if attention == "batch":
        assert (others_changed[0] - logits[0]).abs().max() > 1e-3
        assert (alone[0] - logits[0]).abs().max() > 1e-3
    else:
        torch.testing.assert_close(others_changed[0], logits[0])
        torch.testing.assert_close(alone[0], logits[0])
    # Either way the prediction does not depend on the order of the batch.
    order = torch.randperm(6)
    torch.testing.assert_close(model(ha[:, order], hb[:, order]), logits[order])


@pytest.mark.parametrize("attention", ["batch", "sample"])
def test_compiled_fullgraph_ssfn_matches_eager_values_and_gradients(attention):
    torch.manual_seed(3)
    model = SSFN(16, 2, 32, 5, skew=-1, num_pairs=2, layers=(3, 3), attention=attention, backend="cpu")
    shape = (3, 5, 16) if attention == "batch" else (3, 5, 3, 16)
    ha, hb = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    torch._dynamo.reset()
    out, expected = torch.compile(model, fullgraph=True)(ha, hb), model(ha, hb)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    sources = [ha, hb, *model.parameters()]
    grads = torch.autograd.grad(out.square().sum(), sources)
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected.square().sum(), sources), strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_layer_stack_encoder_yields_every_layer_and_classifies_from_the_last_token_zero():
    torch.manual_seed(3)
    encoder = LayerStackEncoder(5, 7, 3, dim=16, heads=2, layers=4, ffn_dim=32).eval()
    x = torch.randn(2, 7, 5)
    stack = encoder.hidden_states(x)
    assert stack.shape == (4, 2, 8, 16)
    torch.testing.assert_close(stack.mean(-1), torch.zeros(4, 2, 8), atol=1e-5, rtol=0)  # each layer normalised
    torch.testing.assert_close(encoder(x), encoder.head(stack[-1, :, 0]))
    assert not torch.allclose(stack[0], stack[-1])
    with pytest.raises(ValueError, match="T <= 7"):
        encoder.hidden_states(torch.randn(2, 8, 5))


def test_compiled_encoder_names_the_bad_shape():
    # Under torch.compile(dynamic=True) the sizes are symbols while traced: the message must show the numbers.
    encoder = LayerStackEncoder(5, 7, 3, dim=16, heads=2, layers=4, ffn_dim=32).eval()
    compiled = torch.compile(encoder.hidden_states, fullgraph=True, dynamic=True)
    compiled(torch.randn(2, 6, 5))
    with pytest.raises(Exception, match=r"T <= 7, features\), got \(2, 9, 5\)"):
        compiled(torch.randn(2, 9, 5))


def test_hugging_face_adapter_with_a_tiny_random_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    bert = transformers.BertModel(config).eval()
    adapter = HuggingFaceLayerStack(bert)
    input_ids = torch.randint(0, 50, (5, 6))
    stack = adapter.hidden_states(input_ids=input_ids)
    assert stack.shape == (3, 5, 6, 16)
    direct = bert(input_ids=input_ids, output_hidden_states=True).hidden_states
    for layer in range(3):
        torch.testing.assert_close(stack[layer], direct[layer + 1])
    other = LayerStackEncoder(4, 9, 2, dim=16, heads=2, layers=3, ffn_dim=32).eval()
    other_stack = other.hidden_states(torch.randn(5, 9, 4))
    with torch.no_grad():
        model = SSFN(16, 2, 32, 4, skew=1, num_pairs=2, layers=(3, 3))
        assert model(first_token(stack), first_token(other_stack)).shape == (5, 4)
        sample = SSFN(16, 2, 32, 4, skew=-1, num_pairs=1, layers=(3, 3), attention="sample")
        assert sample(stack, other_stack).shape == (5, 4)


def _write_wav(path, samples, rate=8000):
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def test_wav_reader_and_names(tmp_path):
    _write_wav(tmp_path / "7_alice_12.wav", [0, 16384, -32768, 32767])
    signal, rate = fsdd.read_wav(str(tmp_path / "7_alice_12.wav"))
    assert rate == 8000 and signal.tolist() == [0.0, 0.5, -1.0, 32767 / 32768]
    assert fsdd.parse_name("recordings/7_alice_12.wav") == (7, "alice", 12)
    with pytest.raises(ValueError, match="digit"):
        fsdd.parse_name("alice_7.wav")
    with wave.open(str(tmp_path / "stereo.wav"), "wb") as handle:
        handle.setnchannels(2)
        handle.setsampwidth(2)
        handle.setframerate(8000)
        handle.writeframes(b"\0" * 8)
    with pytest.raises(ValueError, match="16-bit mono"):
        fsdd.read_wav(str(tmp_path / "stereo.wav"))


def test_mel_filterbank_and_log_mel_place_a_tone_in_its_band():
    bank = fsdd.mel_filterbank(20, 256, 8000)
    assert bank.shape == (20, 129) and bank.min() >= 0 and bank.max() <= 1
    peaks = bank.argmax(dim=1)
    assert (peaks[1:] > peaks[:-1]).all()  # centres increase
    assert bank.max(dim=1).values.min() > 0.5
    time = torch.arange(4096) / 8000
    tone = torch.sin(2 * math.pi * 1000 * time)
    features = fsdd.log_mel(torch.stack([tone, 0.5 * tone]), 8000, n_fft=256, hop=128, n_mels=20)
    assert features.shape == (2, 1 + 4096 // 128, 20)
    centre = features[0, 16]
    assert int(centre.argmax()) == int(bank[:, 32].argmax())     # 1 kHz is bin 32 of 129
    band = int(centre.argmax())   # power is quadratic: half the amplitude is log(4) less where the tone is
    torch.testing.assert_close(features[0, :, band] - features[1, :, band], torch.full((33,), math.log(4)),
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(fsdd.fix_length(torch.arange(5.0), 3), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(fsdd.fix_length(torch.ones(2), 5), torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0]))


@needs_data
def test_fsdd_reader_on_the_real_recordings():
    signals, digits, speakers, indices = fsdd.read_fsdd(os.path.join(DATA, "fsdd"))
    assert len(signals) == 3000 and np.bincount(digits).tolist() == [300] * 10
    assert sorted(set(speakers)) == ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    assert all(speakers.count(s) == 500 for s in set(speakers)) and indices.max() == 49
    first = speakers.index("george")
    with wave.open(os.path.join(DATA, "fsdd", "recordings", f"{digits[first]}_george_{indices[first]}.wav")) as h:
        assert len(signals[first]) == h.getnframes()
    assert all(np.abs(s).max() <= 1 for s in signals[:50])


def test_pair_by_label_cycles_through_each_labels_images():
    audio_labels = np.array([0, 0, 0, 1, 1, 0, 2])
    image_labels = np.array([0, 1, 0, 2, 1, 1])
    paired = tasks.pair_by_label(np.arange(6), audio_labels, np.array([0, 1, 2, 4]), image_labels,
                                 np.random.default_rng(0))
    assert (image_labels[paired] == audio_labels[:6]).all()
    assert sorted(paired[audio_labels[:6] == 0].tolist()) == [0, 0, 2, 2]
    assert sorted(paired[audio_labels[:6] == 1].tolist()) == [1, 4]
    with pytest.raises(ValueError, match="no image of label 2"):
        tasks.pair_by_label(np.arange(7), audio_labels, np.array([0, 1]), image_labels, np.random.default_rng(0))


@needs_data
def test_digits_pairs_are_speaker_and_image_disjoint_and_label_matched():
    data = tasks.load_digits_task(types.SimpleNamespace(data=None, seed=0, max_samples=None))
    audio, image = data.items
    assert audio.shape == (3000, 25, 40) and image.shape == (1797, 8, 8)
    _, _, speakers, _ = fsdd.read_fsdd(os.path.join(DATA, "fsdd"))
    speakers = np.array(speakers)
    seen_speakers, seen_images = [], []
    for name, (audio_index, image_index, labels) in data.splits.items():
        assert (data.labels[0][audio_index] == labels).all() and (data.labels[1][image_index] == labels).all()
        seen_speakers.append(set(speakers[audio_index]))
        seen_images.append(set(image_index.tolist()))
        for digit in range(10):
            # The split's images of the digit are reused evenly: use counts differ by at most one.
            uses = np.unique(image_index[labels == digit], return_counts=True)[1]
            assert len(uses) > 30 and uses.max() - uses.min() <= 1
    assert len(seen_speakers[0]) == 4 and len(seen_speakers[1]) == len(seen_speakers[2]) == 1
    for first in range(3):
        for second in range(first + 1, 3):
            assert not seen_speakers[first] & seen_speakers[second]
            assert not seen_images[first] & seen_images[second]
    train = data.splits["train"][0]
    np.testing.assert_allclose(audio[train].mean(axis=(0, 1)), 0, atol=1e-4)


def test_digits_task_without_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # a None entry makes the import fail
    with pytest.raises(ImportError, match=r"pip install scikit-learn \(or stepfusion-kernels\[ssfn\]\)"):
        tasks.load_digits_task(types.SimpleNamespace(data=None, seed=0, max_samples=None))


@needs_data
def test_mfeat_views_as_tokens():
    data = tasks.load_mfeat_task(types.SimpleNamespace(data=None, seed=0, max_samples=None, views=["pix", "fou"]))
    assert data.items[0].shape == (2000, 16, 15) and data.items[1].shape == (2000, 19, 4)
    sizes = {name: len(split[2]) for name, split in data.splits.items()}
    assert sizes == {"train": 1200, "validation": 400, "test": 400}
    assert all((a == b).all() for a, b, _ in data.splits.values())
    assert tasks.view_tokens("mor", np.ones((3, 6), np.float32)).shape == (3, 2, 3)


TINY = ["--layers", "3", "--dim", "16", "--heads", "2", "--ffn-dim", "32", "--encoder-epochs", "1", "--epochs", "2",
        "--repeats", "2", "--threads", "1", "--no-progress", "--sweep", "--skews", "-1", "0", "2", "--sparsity", "1",
        "2"]


@needs_data
@pytest.mark.parametrize("task,extra", [("ssfn-digits", ["--max-samples", "60"]),
                                        ("ssfn-mfeat", ["--max-samples", "60", "--attention", "sample"])])
def test_short_sweep_on_a_slice(task, extra, tmp_path):
    assert cli.main([task, *TINY, *extra, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "metrics.json") as handle:
        report = json.load(handle)
    results = report["results"]
    # d = 2 with D = 2 fits in 3 layers: (2, 0), (1, -1) does not; the others do.
    cells = {name for name in results if name.startswith("d=")}
    assert cells == {"d=-1, D=1", "d=0, D=1", "d=2, D=1", "d=-1, D=2", "d=0, D=2"}
    names = report["modalities"]
    assert {"late fusion", "pairwise fusion", f"unimodal {names[0]}", f"unimodal {names[1]}"} <= set(results)
    assert results["d=0, D=1"]["test"] == results["late fusion"]["test"]
    assert results["d=2, D=1"]["pairs"] == [[2, 0]]
    for result in results.values():
        assert len(result["test"]) == 2 and all(0 <= v <= 1 for v in result["test"] + result["validation"])
    assert report["split_sizes"]["test"] <= 60
    assert (tmp_path / "heatmap.png").stat().st_size > 0 and (tmp_path / "encoders.pt").stat().st_size > 0
    assert (tmp_path / "table.md").read_text().startswith(f"**{task}**")


@needs_data
@pytest.mark.parametrize(("autocast", "dtype", "backend"), [("bf16", torch.bfloat16, "auto"),
                                                            ("fp16", torch.float16, "reference")])
def test_autocast_runs_encoders_and_heads_in_its_dtype(tmp_path, autocast, dtype, backend):
    seen = set()  # (module class, training?, dtype of its output) of every forward of an encoder or a head

    def hook(module, args, output):
        if isinstance(module, (LayerStackEncoder, SSFN)):
            seen.add((type(module).__name__, module.training, output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        assert cli.main(["ssfn-mfeat", "--layers", "2", "--dim", "16", "--heads", "2", "--ffn-dim", "32",
                         "--encoder-epochs", "1", "--epochs", "1", "--repeats", "1", "--skew", "1", "--threads", "1",
                         "--no-progress", "--max-samples", "40", "--autocast", autocast, "--backend", backend,
                         "--out", str(tmp_path)]) == 0
    finally:
        handle.remove()
    assert seen == {(name, training, dtype) for name in ("LayerStackEncoder", "SSFN") for training in (True, False)}
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["config"]["autocast"] == autocast
    assert all(0 <= value <= 1 for result in report["results"].values() for value in result["test"])


def test_layer_stacks_under_autocast_are_float32_and_close():
    torch.manual_seed(0)
    encoder = LayerStackEncoder(5, 4, 3, dim=16, heads=2, layers=2, ffn_dim=32).eval()
    items = torch.randn(7, 4, 5)
    exact = tasks.layer_stacks(encoder, items, "all")
    low = tasks.layer_stacks(encoder, items, "all", autocast="bf16")
    assert exact.dtype == low.dtype == torch.float32 and not torch.equal(exact, low)
    torch.testing.assert_close(low, exact, rtol=0.05, atol=0.05)


def test_stepfusion_train_hosts_the_ssfn_tasks():
    for task in tasks.TASKS:
        args = cli.parser().parse_args([task, "--sweep", "--epochs", "1", "--attention", "sample"])
        assert (args.task, args.sweep, args.epochs, args.attention, args.layers) == (task, True, 1, "sample", 12)
