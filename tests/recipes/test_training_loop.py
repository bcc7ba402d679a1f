"""A researcher's training loop (issue 22, items 1 and 2): mixed precision under torch.autocast (what Trainer(bf16=True)
and `abft train --bf16` run) and evaluation inside ABFTTrainer (eval_loss, counted heads, accuracy, best checkpoint).
Offline: the tiny tokenizer, a tiny Llama and a generated CSV task; exactness against eager attention."""
import copy
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import abft_kernels as ak
from abft_kernels.hf import LabelSpec, trainable_qk
from abft_kernels.recipes.icl import ICLCollator, PromptBuilder, load_task, training_prompts
from abft_kernels.ops.label_attention.sdpa import attention_output
from abft_kernels.ops.label_attention.validation import LabelAttentionArgs
from abft_kernels.recipes.settings import PAPER
from abft_kernels.recipes.training import WEIGHTS_FILE, ABFTTrainer, abft_training_arguments, icl_accuracy
from test_train_options import SENTIMENT, counting_llama, write_task
from tiny_icl import tiny_llama, tiny_tokenizer

BF16_TOLERANCE = 1e-2  # docs/design.md §6: relative error of fp16/bf16 results
CPU_BACKENDS = ("reference", "torch", "triton")


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm())


def op_inputs(device="cpu", seed=0):
    """fp32 q and k, as the rotary embedding hands them over under autocast, and v in bf16; labels, rows, padding."""
    torch.manual_seed(seed)
    batch, heads, kv_heads, seq_len, head_dim = 2, 4, 2, 37, 16
    q = torch.randn(batch, heads, seq_len, head_dim, device=device)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, device=device)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, device=device).bfloat16()
    key_class = torch.full((batch, seq_len), -1, device=device)
    key_class[:, [4, 11, 19, 30]] = torch.tensor([0, 1, 2, 0], device=device)
    rows = torch.tensor([[seq_len - 1, 20], [seq_len - 3, -1]], device=device)
    padding = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    padding[1, -2:] = False
    return q, k, v, key_class, rows, padding


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def run_op(q, k, v, key_class, rows, padding, backend, device_type, dtype=None):
    """out, mass and the gradients of q, k, v of one label_attention call; under torch.autocast(device_type, dtype)
    when dtype is given. backward() runs outside autocast, as Trainer runs it."""
    q, k, v = leaves(q, k, v)
    if dtype is None:
        out, mass = ak.label_attention(q, k, v, key_class, 3, query_rows=rows, key_padding_mask=padding,
                                       backend=backend)
    else:
        with torch.autocast(device_type, dtype):
            out, mass = ak.label_attention(q, k, v, key_class, 3, query_rows=rows, key_padding_mask=padding,
                                           backend=backend)
    (out.float().square().sum() + (mass * torch.arange(1.0, 4.0, device=mass.device)).sum()).backward()
    return out, mass, q.grad, k.grad, v.grad


def check_op_under_autocast(backend, device_type, dtype):
    q, k, v, key_class, rows, padding = op_inputs(device_type)
    out, mass, *grads = run_op(q, k, v, key_class, rows, padding, backend, device_type, dtype)
    # The same op on inputs cast by hand, outside autocast: what SDPA does under autocast.
    cast_out, cast_mass, *cast_grads = run_op(q.to(dtype), k.to(dtype), v.to(dtype), key_class, rows, padding,
                                              backend, device_type)
    assert out.dtype == dtype and mass.dtype == torch.float32
    assert torch.equal(out, cast_out) and torch.equal(mass, cast_mass)
    for grad, cast_grad in zip(grads, cast_grads):  # the cast's backward: the same values, in the inputs' dtypes
        assert torch.equal(grad, cast_grad.to(grad.dtype))
    assert grads[0].dtype == torch.float32 and grads[2].dtype == torch.bfloat16
    # And close to float64 on the uncast inputs, within the half-precision tolerance.
    _, ref_mass, *_ = run_op(q.double(), k.double(), v.double(), key_class, rows, padding, "reference", device_type)
    assert relative_error(mass, ref_mass) < BF16_TOLERANCE


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_op_under_cpu_autocast_equals_the_op_on_cast_inputs(backend):
    check_op_under_autocast(backend, "cpu", torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast runs on a GPU")
@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_op_under_cuda_fp16_autocast_equals_the_op_on_cast_inputs(backend):
    check_op_under_autocast(backend, "cuda", torch.float16)


def test_float64_inputs_stay_float64_under_autocast():
    """Autocast leaves float64 tensors alone, and so does the op (as SDPA)."""
    q, k, v, key_class, rows, padding = op_inputs()
    q, k, v = q.double(), k.double(), v.double()
    with torch.autocast("cpu", torch.bfloat16):
        out, mass = ak.label_attention(q, k, v, key_class, 3, query_rows=rows, backend="torch")
    ref_out, ref_mass = ak.label_attention(q, k, v, key_class, 3, query_rows=rows, backend="torch")
    assert out.dtype == torch.float64 and torch.equal(out, ref_out) and torch.equal(mass, ref_mass)


def test_output_only_path_under_autocast_trains_outside_it():
    """The plain path of attn_implementation="abft" on a padded batch (sdpa.attention_output, whose backward
    recomputes the attention): fp32 q/k and bf16 v under autocast, backward outside autocast."""
    q, k, v, _, _, padding = op_inputs()

    def output(q, k, v, dtype=None):
        q, k, v = leaves(q, k, v)
        args = LabelAttentionArgs(q=q, k=k, v=v, key_class=None, num_classes=1, query_rows=None, causal=True,
                                  scale=q.shape[-1] ** -0.5, key_padding_mask=padding, sinks=None)
        if dtype is None:
            out = attention_output(args)
        else:
            with torch.autocast("cpu", dtype):
                out = attention_output(args)
        out.float().square().sum().backward()
        return out, q.grad, k.grad, v.grad

    out, *grads = output(q, k, v, torch.bfloat16)
    cast_out, *cast_grads = output(q.bfloat16(), k.bfloat16(), v)
    assert out.dtype == torch.bfloat16 and torch.equal(out, cast_out)
    assert all(torch.equal(g, c.to(g.dtype)) for g, c in zip(grads, cast_grads))


# ---------------------------------------------------------------------------------------------------------------
# The model and the Trainer

@pytest.fixture(scope="module")
def icl(tmp_path_factory):
    """(tokenizer, builder, train prompts, eval prompts) of the generated sentiment task, k = 2."""
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    path = write_task(tmp_path_factory.mktemp("task") / "task.csv")
    task = load_task(str(path), template=SENTIMENT, test_size=8)
    builder = PromptBuilder(tokenizer, SENTIMENT, style="staicc")
    train = training_prompts(builder, task.train, k=2, num_prompts=8, seed=0)
    held_out = training_prompts(builder, task.train, k=2, num_prompts=7, seed=7)  # the 7th passes a filter
    return tokenizer, builder, train, held_out


def eager_masses(reference, batch, num_classes):
    """Every layer's label masses [B,H,R,C] at the loss rows, summed from eager attention's probabilities."""
    rows = batch.get("loss_rows", batch["query_rows"])
    out = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True,
                    use_cache=False)
    one_hot = torch.nn.functional.one_hot(batch["key_class"].clamp(min=0), num_classes).float()
    one_hot = one_hot * (batch["key_class"] >= 0)[..., None]  # [B,N,C]
    masses = []
    for probs in out.attentions:  # [B,H,N,N] float32 (eager's softmax is in float32 under autocast too)
        at_rows = probs.gather(2, rows[:, None, :, None].expand(-1, probs.shape[1], -1, probs.shape[-1]))
        masses.append((at_rows.double() @ one_hot[:, None].double()).float())  # float64: autocast leaves it
    assert len(masses) == reference.config.num_hidden_layers
    return masses, out


def loss_by_hand(masses, batch, A, B=PAPER.B, count_all_heads=False):
    return ak.abft_loss(masses, batch["target_class"], batch["key_class"], batch.get("loss_rows", batch["query_rows"]),
                        A=A, B=B, key_padding_mask=batch["attention_mask"].bool(), count_all_heads=count_all_heads)


def models(vocab_size, counting=False):
    """(model with the "abft" attention, eager reference with the same weights). counting: counting_llama, whose
    peaked attention makes some heads pass the induction filter; else tiny_llama (weights of std 0.02). Under bf16
    autocast counting_llama's large attention scores (tens) are themselves rounded by eager attention's bf16 matmul,
    which moves its masses by 5-7% from float32: the mixed-precision comparisons use tiny_llama."""
    model = counting_llama(vocab_size) if counting else tiny_llama(vocab_size)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    model.set_attn_implementation("abft")
    return model, reference


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_abft_call_under_autocast_matches_eager_under_autocast(icl, backend):
    tokenizer, _, train, _ = icl
    model, reference = models(len(tokenizer))
    batch = ICLCollator(tokenizer.pad_token_id)(train[:4])  # right padding: prompts of different lengths
    assert not batch["attention_mask"].bool().all()
    rows = batch.get("loss_rows", batch["query_rows"])
    spec = LabelSpec(batch["key_class"], rows, 2, backend=backend)
    with torch.autocast("cpu", torch.bfloat16):
        ref_masses, ref = eager_masses(reference, batch, 2)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], abft=spec,
                    output_attentions=True, use_cache=False)
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    with torch.no_grad():
        exact = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    real = batch["attention_mask"].bool()
    for mass, ref_mass in zip(out.attentions, ref_masses):
        assert mass.dtype == torch.float32 and relative_error(mass, ref_mass) < BF16_TOLERANCE
    assert relative_error(out.logits[real], ref.logits[real]) < BF16_TOLERANCE
    assert relative_error(plain.logits[real], ref.logits[real]) < BF16_TOLERANCE
    assert relative_error(ref.logits[real], exact.logits[real]) < BF16_TOLERANCE  # autocast was on
    assert out.logits.dtype == plain.logits.dtype == torch.bfloat16
    plain.logits.float().square().mean().backward()  # outside autocast, as Trainer: the padded path's recompute
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def make_trainer(model, tokenizer, builder, train, output_dir, steps=1, settings=PAPER, eval_dataset=None,
                 compute_metrics=icl_accuracy, **overrides):
    trainable_qk(model)
    args = abft_training_arguments(str(output_dir), learning_rate=overrides.pop("learning_rate", 1e-2), steps=steps,
                                   prompts_per_step=4, micro_batch=4, save_steps=overrides.pop("save_steps", 0),
                                   disable_tqdm=True, use_cpu=True, **overrides)
    return ABFTTrainer(model=model, args=args, train_dataset=train, data_collator=ICLCollator(tokenizer.pad_token_id),
                       num_classes=2, settings=settings, label_token_ids=builder.label_token_ids,
                       eval_dataset=eval_dataset, compute_metrics=compute_metrics if eval_dataset else None)


def test_trainer_bf16_step_matches_eager_under_autocast(icl, tmp_path):
    """Trainer(bf16=True) on CPU: one step's ABFT loss is eager attention's under the same autocast (bf16
    tolerance); only W_Q/W_K move. Every head is in the loss (count_all_heads): tiny_llama's near-uniform attention
    passes no induction filter."""
    tokenizer, builder, train, _ = icl
    model, reference = models(len(tokenizer))
    batch = ICLCollator(tokenizer.pad_token_id)(train[:4])  # the step's 4 prompts (their order does not matter)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected, _ = loss_by_hand(eager_masses(reference, batch, 2)[0], batch, A=PAPER.A0, count_all_heads=True)
    with torch.no_grad():
        exact, _ = loss_by_hand(eager_masses(reference, batch, 2)[0], batch, A=PAPER.A0, count_all_heads=True)
    assert expected != exact and float(expected) > 0  # autocast changed the loss
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = make_trainer(model, tokenizer, builder, train[:4], tmp_path, bf16=True,
                           settings=replace(PAPER, count_all_heads=True))
    evaluated = trainer.evaluate(train[:4])["eval_loss"]  # before the step, under the same autocast
    assert evaluated == pytest.approx(float(expected), rel=BF16_TOLERANCE)
    trainer.train()
    log = trainer.state.log_history[0]
    assert math.isfinite(log["loss"]) and log["abft_loss"] == pytest.approx(float(expected), rel=BF16_TOLERANCE)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.split(".")[-2] in ("q_proj", "k_proj") for name in changed), sorted(changed)


def test_evaluate_reports_abft_loss_counted_heads_gold_mass_and_accuracy(icl, tmp_path):
    """trainer.evaluate(): eval_loss is abft_loss with A0 on eager attention's masses (no gradient), averaged over
    the prompts of unequal batches; counted heads and gold mass per prompt; accuracy of the read-out. The controller
    is left as it was."""
    tokenizer, builder, train, held_out = icl
    model, reference = models(len(tokenizer), counting=True)
    trainer = make_trainer(model, tokenizer, builder, train[:4], tmp_path, eval_dataset=held_out,
                           per_device_eval_batch_size=2, eval_strategy="steps", eval_steps=1)
    trainer.controller.pid.A = 0.8  # as after some steps: evaluation uses A0 and leaves the controller alone
    controller = (trainer.controller.pid.state_dict(), trainer.controller._sums.clone())
    metrics = trainer.evaluate()

    collate, label_ids = ICLCollator(tokenizer.pad_token_id), torch.tensor(builder.label_token_ids)
    loss = heads = gold = correct = 0.0
    with torch.no_grad():
        for first in range(0, len(held_out), 2):  # the Trainer's batches: 2, 2, 2, 1 prompts
            batch = collate(held_out[first:first + 2])
            masses, out = eager_masses(reference, batch, 2)
            batch_loss, info = loss_by_hand(masses, batch, A=PAPER.A0)
            size = batch["input_ids"].shape[0]
            loss += float(batch_loss) * size
            heads += float(info.counted_heads.sum())
            gold += float(info.gold_mass.mean(dim=(0, 2, 3)).sum())
            read_out = out.logits[torch.arange(size), batch["query_rows"][:, 0]][:, label_ids]
            correct += float((read_out.argmax(-1) == batch["target_class"][:, 0]).sum())
    n = len(held_out)
    assert metrics["eval_loss"] == pytest.approx(loss / n, rel=1e-5)
    assert metrics["eval_counted_heads"] == pytest.approx(heads / n, rel=1e-6) and heads > 0
    assert metrics["eval_gold_mass"] == pytest.approx(gold / n, rel=1e-5)
    assert metrics["eval_accuracy"] == correct / n
    assert trainer.controller.pid.state_dict() == controller[0] and torch.equal(trainer.controller._sums,
                                                                                  controller[1])
    assert not model.training or trainer.model is model  # evaluate() switched to eval mode on its own
    with pytest.raises(ValueError, match="compute_metrics needs label_token_ids"):
        ABFTTrainer(model=model, args=trainer.args, train_dataset=train, num_classes=2, compute_metrics=icl_accuracy)


def train_with_best_checkpoint(icl, output_dir, steps, **overrides):
    """An ABFT run evaluated and checkpointed at every step with load_best_model_at_end; returns (model, trainer, the
    trained tensors after each step)."""
    tokenizer, builder, train, held_out = icl
    model, _ = models(len(tokenizer), counting=True)
    trainer = make_trainer(model, tokenizer, builder, train, output_dir, steps=steps, learning_rate=5e-2,
                           save_steps=1, settings=replace(PAPER, count_all_heads=True), eval_dataset=held_out,
                           per_device_eval_batch_size=7, eval_strategy="steps", eval_steps=1,
                           load_best_model_at_end=True, **overrides)
    snapshots = []

    class KeepWeights(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append({name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad})

    trainer.add_callback(KeepWeights())
    trainer.train()
    return model, trainer, snapshots


def check_best_checkpoint_loaded(model, trainer, snapshots, output_dir, best_step):
    assert trainer.state.best_model_checkpoint == str(output_dir / f"checkpoint-{best_step}")
    saved = load_file(str(output_dir / f"checkpoint-{best_step}" / WEIGHTS_FILE))
    assert saved.keys() == snapshots[best_step - 1].keys()  # only the trained Q/K tensors
    weights = dict(model.named_parameters())
    for name, tensor in saved.items():
        assert torch.equal(weights[name].detach(), tensor) and torch.equal(tensor, snapshots[best_step - 1][name])


def test_eval_strategy_steps_with_load_best_model_at_end_on_eval_loss(icl, tmp_path):
    """eval_strategy="steps", load_best_model_at_end, metric_for_best_model left to its default (eval_loss, which an
    ICL batch without `labels` used not to have): every step is evaluated, and the model ends with the trained
    tensors of the checkpoint of the least eval_loss."""
    model, trainer, snapshots = train_with_best_checkpoint(icl, tmp_path, steps=2)
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [1, 2]
    assert all(math.isfinite(e["eval_loss"]) and "eval_counted_heads" in e and "eval_accuracy" in e for e in evals)
    best = min(evals, key=lambda entry: entry["eval_loss"])
    check_best_checkpoint_loaded(model, trainer, snapshots, tmp_path, best["step"])
    assert trainer.evaluate()["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-6)


def test_load_best_model_at_end_reloads_an_earlier_checkpoint(icl, tmp_path):
    """The best checkpoint is not the last one (a metric that prefers the first evaluation): loading it puts back its
    trained Q/K tensors, which the later steps had changed, and the reloaded model evaluates as it did then."""
    evaluations = []

    def first_is_best(prediction):
        evaluations.append(prediction)
        return {**icl_accuracy(prediction), "earliness": -len(evaluations)}

    model, trainer, snapshots = train_with_best_checkpoint(icl, tmp_path, steps=3, compute_metrics=first_is_best,
                                                           metric_for_best_model="earliness")
    first = next(entry for entry in trainer.state.log_history if "eval_loss" in entry)
    check_best_checkpoint_loaded(model, trainer, snapshots, tmp_path, best_step=1)
    assert any(not torch.equal(snapshots[0][name], snapshots[-1][name]) for name in snapshots[0])  # steps 2, 3 moved
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)
    assert metrics["eval_gold_mass"] == pytest.approx(first["eval_gold_mass"], rel=1e-6)
