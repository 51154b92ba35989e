"""In-training evaluation: eval loss (token mean, each eval example once) and GSM8K accuracy by generation.

Loss alone says little about whether a model got better at math; the 2023 run never measured
accuracy at all. Accuracy here uses the training prompt format, greedy decoding, and the same
answer extraction as `synthtune score`.
"""

from __future__ import annotations

from synthtune.config import TrainConfig
from synthtune.formats import add_special_tokens, resolve_format, stop_strings, zero_shot_prompt


def eval_loss(acc, model, loader, seq2seq: bool) -> float | None:
    import torch

    from synthtune.train.loss import model_inputs, token_loss_sum

    if loader is None:
        return None
    total = torch.zeros((), device=acc.device, dtype=torch.float64)
    count = torch.zeros((), device=acc.device, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            out = model(**model_inputs(batch, seq2seq))
            labels = batch["labels"]
            rows = torch.stack([token_loss_sum(out.logits[i:i + 1], labels[i:i + 1], seq2seq)
                                for i in range(labels.shape[0])]).double()
            n = ((labels if seq2seq else labels[:, 1:]) != -100).sum(dim=1).double()
            # Per example, gathered: on several ranks the last batch of a shorter shard is padded
            # with repeats of the first examples (every rank must run the same forwards under
            # ZeRO-3); gather_for_metrics drops them, so each eval example counts once.
            rows, n = acc.gather_for_metrics((rows, n))
            total += rows.sum()
            count += n.sum()
    return float(total / count.clamp(min=1))


def _sharded(acc) -> bool:
    """Whether each forward all-gathers parameters from every rank (ZeRO-3, FSDP): then a rank
    whose answers ended early must keep joining the others' forwards (generate's synced_gpus),
    or they wait for it (NCCL: a hang; gloo: a collective mismatch)."""
    from accelerate.utils import DistributedType

    if acc.num_processes < 2:
        return False
    if acc.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return plugin is not None and getattr(plugin, "zero_stage", 0) == 3


def accuracy_inputs(rows: list[dict], tokenizer, fmt: str, seq2seq: bool) -> tuple[list[str], bool, tuple[str, ...]]:
    """What the model is fed for ``rows``: the training prompt of each question, whether the
    tokenizer adds its special tokens, and the stop strings (all as ``synthtune eval`` has them)."""
    fmt = resolve_format(fmt, tokenizer, seq2seq)
    texts = [zero_shot_prompt(r["question"], tokenizer, fmt=fmt, is_seq2seq=seq2seq) for r in rows]
    return texts, add_special_tokens(fmt), stop_strings(fmt)


def eval_accuracy(acc, model, tokenizer, questions: list[dict], cfg: TrainConfig, seq2seq: bool) -> dict:
    """Greedy answers to ``questions``, split over ranks, gathered: accuracy and format rate (ours, by
    value), and lm-evaluation-harness's gsm8k strict-match and flexible-extract on the same answers."""
    import torch
    from accelerate.utils import gather_object

    from synthtune.data.answers import extract_strict, is_correct
    from synthtune.data.lmeval_gsm8k import lm_eval_score
    from synthtune.generation.base import SamplingParams, logits_processors, truncate_at_stop

    if not questions:
        return {}
    rank, world = acc.process_index, acc.num_processes
    mine = questions[rank::world]
    # Under ZeRO-3 and FSDP every rank must join every forward (synced_gpus), so all ranks run the
    # same number of generate calls; short shards repeat their last question and drop the repeat.
    per_rank = -(-len(questions) // world)
    padded = mine + [mine[-1] if mine else questions[0]] * (per_rank - len(mine))
    prompts, add_special, stop = accuracy_inputs(padded, tokenizer, cfg.prompt_format, seq2seq)
    # The plain format's answers can run on into a made-up next question, as in `synthtune eval`;
    # stopping there saves most of the generation budget for models that do not emit EOS yet.
    stop_kwargs = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
    unwrapped = acc.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    side = tokenizer.padding_side  # put back after: the final tokenizer is saved with the base's side
    if not seq2seq:
        tokenizer.padding_side = "left"
    results = []
    bs = max(1, cfg.per_device_batch_size)
    for start in range(0, len(padded), bs):
        chunk = padded[start:start + bs]
        enc = tokenizer(prompts[start:start + bs], return_tensors="pt", padding=True,
                        add_special_tokens=add_special).to(acc.device)
        # eval_calculator: GSM8K's calculator writes each annotation's result, as `synthtune eval` does
        processors = logits_processors(SamplingParams(calculator=cfg.eval_calculator), tokenizer,
                                       1 if seq2seq else enc["input_ids"].shape[1])
        extra = {} if processors is None else {"logits_processor": processors}
        with torch.no_grad(), acc.autocast():
            out = unwrapped.generate(**enc, max_new_tokens=cfg.eval_max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, synced_gpus=_sharded(acc),
                                     use_cache=True, **stop_kwargs, **extra)
        new = out if seq2seq else out[:, enc["input_ids"].shape[1]:]
        texts = [truncate_at_stop(t, stop) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        for j, (row, text) in enumerate(zip(chunk, texts, strict=True)):
            if start + j < len(mine):
                lm = lm_eval_score(text, row["answer"])
                results.append({"correct": is_correct(text, row["answer"]),
                                "strict": extract_strict(text) is not None,
                                "lm_strict": lm.strict_correct, "lm_flexible": lm.flexible_correct})
    tokenizer.padding_side = side
    if was_training:
        unwrapped.train()
    everything = gather_object(results)
    n = len(everything)
    return {"eval/accuracy": sum(r["correct"] for r in everything) / n if n else 0.0,
            "eval/format_rate": sum(r["strict"] for r in everything) / n if n else 0.0,
            "eval/lm_eval_strict_match": sum(r["lm_strict"] for r in everything) / n if n else 0.0,
            "eval/lm_eval_flexible_extract": sum(r["lm_flexible"] for r in everything) / n if n else 0.0,
            "eval/n_questions": n}


def evaluate(acc, model, tokenizer, loader, questions, cfg: TrainConfig, seq2seq: bool) -> dict:
    model.eval()
    metrics = {}
    loss = eval_loss(acc, model, loader, seq2seq)
    if loss is not None:
        metrics["eval/loss"] = loss
    metrics.update(eval_accuracy(acc, model, tokenizer, questions, cfg, seq2seq))
    return metrics
