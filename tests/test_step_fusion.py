"""StepFusionNet: shapes of both heads, Lq != Lk, K = 0 and K = 3, shared steps, every parameter in use,
torch.compile(fullgraph=True) of the whole model, torch.export and AOTInductor, per-sample gradients through
torch.func, a few optimizer steps lowering the loss on a fixed batch. Runs on the C++ CPU backend."""

import pytest
import torch

from stepfusion_kernels.models import StepFusionConfig, StepFusionNet

BACKEND = "cpu"


def make(head="classify", steps=2, **overrides):
    fields = dict(in_a=3, in_b=5, max_len_a=17, max_len_b=9, head=head, dim=16, heads=2, steps=steps, window=2,
                  global_tokens=2, dropout=0.0, backend=BACKEND)
    if head == "classify":
        fields["num_classes"] = 4
    else:
        fields.update(horizon=7, out_vars=2, skip_len=4)
    fields.update(overrides)
    torch.manual_seed(0)
    return StepFusionNet(StepFusionConfig(**fields))


def inputs(batch=3, len_a=17, len_b=9):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, len_a, 3, generator=generator), torch.randn(batch, len_b, 5, generator=generator),
            torch.randn(batch, 4, 2, generator=generator))


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_classify_head_shape_with_different_lengths(steps):
    a, b, _ = inputs()
    logits = make(steps=steps)(a, b)
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()


@pytest.mark.parametrize("steps", [0, 3])
def test_forecast_head_shape(steps):
    a, b, skip = inputs()
    forecast = make("forecast", steps=steps)(a, b, skip)
    assert forecast.shape == (3, 7, 2) and torch.isfinite(forecast).all()


def test_sequences_shorter_than_the_maximum_classify():
    a, b, _ = inputs()
    assert make(steps=2)(a[:, :5], b[:, :3]).shape == (3, 4)


def test_without_fusion_the_forecast_ignores_modality_b():
    model = make("forecast", steps=0).eval()
    a, b, skip = inputs()
    torch.testing.assert_close(model(a, b, skip), model(a, torch.randn_like(b), skip), rtol=0, atol=0)


def test_with_fusion_the_forecast_depends_on_modality_b():
    model = make("forecast", steps=1).eval()
    a, b, skip = inputs()
    assert not torch.allclose(model(a, b, skip), model(a, torch.randn_like(b), skip))


def test_a_step_starts_near_the_identity():
    # gate_init = 0 makes every step exactly x -> LayerNorm(x); with unit LayerNorm weight the encoders'
    # output, normalised, is what the head sees.
    model = make("forecast", steps=2, gate_init=0.0).eval()
    a, b, _ = inputs()
    fused_a, _ = model.fuse(a, b)
    encoded = model.encoder_a(a)
    torch.testing.assert_close(fused_a, torch.nn.functional.layer_norm(encoded, (16,)), rtol=1e-4, atol=1e-4)


def test_shared_steps_reuse_one_set_of_weights():
    shared, separate = make(steps=3, share_steps=True), make(steps=3)
    step = sum(p.numel() for p in separate.steps[0].parameters())
    assert separate.num_parameters() - shared.num_parameters() == 2 * step
    assert shared.steps[0] is shared.steps[2]


@pytest.mark.parametrize("share_steps", [False, True])
@pytest.mark.parametrize("steps", [0, 1, 3])
@pytest.mark.parametrize("head", ["classify", "forecast"])
def test_every_parameter_gets_a_gradient(head, steps, share_steps):
    # DistributedDataParallel refuses a parameter that takes no part in the loss. The forecast head reads
    # A only, so the model has no B half-step after A's last one (and no B encoder without steps).
    model = make(head, steps=steps, share_steps=share_steps)
    a, b, skip = inputs()
    model(a, b, skip if head == "forecast" else None).square().sum().backward()
    unused = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert not unused


def test_forecast_model_has_the_classify_models_initial_encoders_and_steps_but_the_last_b_half_step():
    # Same seed, same encoders and steps: dropping B's last half-step changed nothing else of them.
    forecast, classify = make("forecast", steps=2).state_dict(), make("classify", steps=2).state_dict()
    assert not any(name.startswith("steps.1.b_from_a.") for name in forecast)
    shared = [name for name in forecast if name in classify]
    assert len(shared) == len(forecast) - 4  # all but the forecast and skip maps' weights and biases
    for name in shared:
        assert torch.equal(forecast[name], classify[name]), name


@pytest.mark.parametrize("head", ["classify", "forecast"])
def test_compiled_fullgraph_model_matches_eager_values_and_gradients(head):
    model = make(head, steps=2)
    a, b, skip = inputs()
    args = (a, b, skip) if head == "forecast" else (a, b)
    torch._dynamo.reset()  # a fresh cache: each model instance is a graph of its own
    compiled = torch.compile(model, fullgraph=True)
    out, expected = compiled(*args), model(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="head"):
        StepFusionConfig(in_a=1, in_b=1, max_len_a=4, max_len_b=4, head="regress")
    with pytest.raises(ValueError, match="num_classes"):
        StepFusionConfig(in_a=1, in_b=1, max_len_a=4, max_len_b=4, head="classify")
    with pytest.raises(ValueError, match="horizon"):
        StepFusionConfig(in_a=1, in_b=1, max_len_a=4, max_len_b=4, head="forecast")
    with pytest.raises(ValueError, match="steps"):
        StepFusionConfig(in_a=1, in_b=1, max_len_a=4, max_len_b=4, num_classes=2, steps=-1)


def test_bad_inputs_are_rejected():
    model = make("forecast")
    a, b, skip = inputs()
    with pytest.raises(ValueError, match="skip"):
        model(a, b)
    with pytest.raises(ValueError, match="max_len_a"):
        model(a[:, :5], b, skip)
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.randn(3, 18, 3), b, skip)


@pytest.mark.parametrize("head", ["classify", "forecast"])
def test_a_few_optimizer_steps_lower_the_loss_on_a_fixed_batch(head):
    model = make(head, steps=2)
    a, b, skip = inputs(batch=8)
    if head == "classify":
        target = torch.arange(8) % 4

        def loss_fn():
            return torch.nn.functional.cross_entropy(model(a, b), target)
    else:
        target = torch.randn(8, 7, 2, generator=torch.Generator().manual_seed(2))

        def loss_fn():
            return torch.nn.functional.mse_loss(model(a, b, skip), target)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = loss_fn().item()
    for _ in range(15):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    assert loss_fn().item() < 0.7 * first


def test_every_fusion_parameter_gets_a_gradient():
    model = make("classify", steps=2)
    a, b, _ = inputs()
    model(a, b).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_per_sample_gradients_with_torch_func_match_one_backward_per_sample():
    """torch.func.vmap(torch.func.grad(...)) over the batch (DP-SGD-style per-sample gradients) through the
    kernel backend gives each sample's gradient, as a backward pass of that sample alone does."""
    model = make("classify", steps=2).eval()
    a, b, _ = inputs(batch=3)
    labels = torch.tensor([0, 3, 1])
    params = {name: value.detach() for name, value in model.named_parameters()}

    def loss(params, a, b, label):
        logits = torch.func.functional_call(model, params, (a[None], b[None]))
        return torch.nn.functional.cross_entropy(logits, label[None])

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(params, a, b, labels)
    for index in range(3):
        model.zero_grad()
        loss(dict(model.named_parameters()), a[index], b[index], labels[index]).backward()
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(per_sample[name][index], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_exported_with_a_dynamic_batch_and_packaged_by_aot_inductor(tmp_path):
    """Deployment: torch.export with a dynamic batch, then an AOTInductor package, runs other batch sizes."""
    model = make("classify", steps=2).eval()
    a, b, _ = inputs(batch=3)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (a, b), dynamic_shapes=({0: batch}, {0: batch}))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    loaded = torch._inductor.aoti_load_package(package)
    generator = torch.Generator().manual_seed(2)
    a5, b5 = torch.randn(5, 17, 3, generator=generator), torch.randn(5, 9, 5, generator=generator)
    with torch.no_grad():
        expected = model(a5, b5)
    torch.testing.assert_close(program.module()(a5, b5), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded(a5, b5), expected, rtol=1e-5, atol=1e-6)
