"""Knowledge distillation: the student learns the teacher's softened next-token distribution.

The loss on answer tokens (the prompt and the padding are masked, as in Learn) is
``kl_weight * T² * KL(teacher_T || student_T) + (1 - kl_weight) * task cross-entropy``, with both
distributions softened by the temperature ``T`` (the ``T²`` keeps the gradient scale independent of
``T``). The worker that runs it on the DeepSpeed resource is :mod:`sleep_pipeline.train.distil`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _answer_positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that predict an answer token (shifted by one) and the mask that picks them."""
    mask = labels[:, 1:] != -100
    return logits[:, :-1][mask], mask


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Mean KL(teacher || student) per answer token, both softened by ``temperature``."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"student and teacher vocabularies differ ({student_logits.shape[-1]} vs "
                         f"{teacher_logits.shape[-1]}): distillation needs the same tokenizer")
    s, _ = _answer_positions(student_logits, labels)
    t, _ = _answer_positions(teacher_logits, labels)
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    return F.kl_div(F.log_softmax(s.float() / temperature, dim=-1), F.log_softmax(t.float() / temperature, dim=-1),
                    log_target=True, reduction="batchmean")


def distillation_loss(student_logits, teacher_logits, labels, task_loss, temperature: float, kl_weight: float):
    kl = kl_to_teacher(student_logits, teacher_logits, labels, temperature) * temperature ** 2
    return kl_weight * kl + (1.0 - kl_weight) * task_loss


def same_vocabulary(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()


def build_trainer(model, teacher, tokenizer, train_rows: list[dict], val_rows: list[dict], training_arguments: dict,
                  max_length: int, temperature: float, kl_weight: float):
    """A ``transformers`` Trainer whose loss is :func:`distillation_loss` against ``teacher`` (frozen)."""
    from transformers import Trainer, TrainingArguments

    from sleep_pipeline.train.modeling import completion_tensors

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    class DistilTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs)
            with torch.no_grad():
                t_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            loss = distillation_loss(out.logits, t_logits.to(out.logits.device), inputs["labels"], out.loss,
                                     temperature, kl_weight)
            return (loss, out) if return_outputs else loss

    args = TrainingArguments(**training_arguments, remove_unused_columns=False)
    return DistilTrainer(model=model, args=args, train_dataset=train_rows, eval_dataset=val_rows or None,
                         data_collator=lambda rows: completion_tensors(tokenizer, rows, max_length),
                         processing_class=tokenizer)


@torch.no_grad()
def mean_kl(model, teacher, batches: list[dict], temperature: float = 1.0) -> float:
    """Mean KL(teacher || model) per answer token over ``batches`` (for reports and tests)."""
    total, n = 0.0, 0
    for b in batches:
        s = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        tokens = int((b["labels"][:, 1:] != -100).sum())
        total += float(kl_to_teacher(s, t, b["labels"], temperature)) * tokens
        n += tokens
    return total / max(n, 1)
