"""Which execution strategy runs a MAML call: a pure function of the options, facts about the
model, the batch and the mode. ``learner.plan(batch)`` shows it; tests assert on it.

Every strategy computes the same meta-gradient (tested in float64); they differ in speed and
memory. The choices, by measurement (torch 2.13; details in docs/performance.md):

* vmap or a loop over tasks. ``vectorize="auto"``: vmap on CUDA (10x+ faster); on the CPU
  vmap for models without convolutions (the sinusoid MLP: 7x), the loop for convolutions
  (Conv-4: 2.5x; batched convolutions have no fast CPU path under vmap) and for attention
  models when task threads run the loop (the throughput transformer: 3.55 vs vmap 3.87 s/it).
  Always the loop for a model with a module that says ``vmappable = False`` (a per-sentence
  cache of frozen layers).
* where the meta-gradient is taken: by the caller's ``backward`` over all tasks' graphs, or
  task by task (chunk by chunk under vmap) inside ``meta_loss`` (``per_task_backward``), so
  one task's graph is alive at a time.
* task threads (CPU, the loop with per-task backward): each task on one intra-op thread,
  several tasks at once. ``task_threads="auto"`` (the default) uses every torch thread,
  except for models that draw random numbers (dropout: seeded runs would depend on thread
  timing) or carry module hooks (they would fire on the workers' copies of the modules).
* checkpointed inner steps (recomputed in the backward) and compiled inner steps
  (``torch.compile``), when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from metattn.meta.maml.options import MAMLOptions


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs to know about the model (read once, or per call for the parts
    that can change: the training flag, hooks)."""

    has_conv: bool = False
    has_attention: bool = False
    has_norms: bool = False  # any normalisation layer (or has_norms=True declared)
    norms_declared: bool = False  # has_norms=True: the model calls F.batch_norm itself
    running_stats: bool = False  # a BatchNorm that keeps running statistics
    draws_random: bool = False  # active dropout: random draws in the forward
    hooked: bool = False  # forward/backward hooks on a module (or global ones)
    vmappable: bool = True  # no module says it cannot run under vmap (``vmappable = False``)

    @property
    def loop_rewrite(self) -> bool:
        """Whether a task run without vmap needs the norm rewrite (batch statistics, no
        running-stat updates): norms that keep running statistics, or declared norms."""
        return self.has_norms and (self.norms_declared or self.running_stats)


@dataclass(frozen=True)
class Call:
    """The call being planned: its batch and mode."""

    device: str = "cpu"  # device type of the batch
    num_tasks: int = 1
    grad: bool = True  # gradients enabled (training); False in evaluation
    first_order: bool = False
    steps: int = 1
    per_task_loss: bool = False  # meta_loss (the query-loss weights are known)
    inputs_have_graph: bool = False  # inputs requiring grad (a trainable encoder outside)
    recording: bool = False  # attention maps are being recorded
    cpu_threads: int = 1  # torch.get_num_threads()


@dataclass(frozen=True)
class Plan:
    """How one call runs. ``vmap``: all tasks (or chunks of ``chunk_size``) at once, else one
    task at a time. ``backward``: where the meta-gradient is taken ("caller": by the caller's
    backward; "task"/"chunk": inside meta_loss, unit by unit). ``threads``: task threads
    (1 = the caller's thread). ``norms``: how norm layers run (:mod:`metattn.meta.norms`)."""

    vmap: bool
    backward: Literal["caller", "task", "chunk"] = "caller"
    threads: int = 1
    checkpoint: bool = False
    compiled: bool = False
    chunk_size: int | None = None
    math_attention: bool = False  # attention on its twice-differentiable path
    norms: Literal["as_is", "batch_stats", "split_affine"] = "as_is"

    def __str__(self) -> str:
        parts = ["vmap" if self.vmap else "loop"]
        if self.chunk_size:
            parts.append(f"chunks of {self.chunk_size}")
        if self.backward != "caller":
            parts.append(f"backward per {self.backward}")
        if self.threads > 1:
            parts.append(f"{self.threads} task threads")
        parts += [name for name in ("checkpoint", "compiled") if getattr(self, name)]
        return ", ".join(parts)


def task_threads(opts: MAMLOptions, facts: ModelFacts, call: Call) -> int:
    """Task threads for a CPU loop (1 elsewhere, and while attention is recorded: the records
    must come in task order)."""
    if call.device != "cpu" or call.recording:
        return 1
    if opts.task_threads == "auto":
        safe = not (facts.draws_random or facts.hooked)
        return max(1, call.cpu_threads) if safe else 1
    return int(opts.task_threads)


def make_plan(opts: MAMLOptions, facts: ModelFacts, call: Call) -> Plan:
    """The strategy for one call (see the module docstring for why each rule)."""
    second_order = call.grad and not call.first_order and call.steps > 0
    checkpoint = opts.checkpoint and second_order
    # task by task frees each task's graph, so it needs inputs without a graph of their own
    # (a trainable encoder outside the model would be shared by all tasks)
    each = (call.per_task_loss and opts.per_task_backward and call.grad
            and not call.inputs_have_graph)
    # never more threads than tasks: idle workers would only take the caller's threads
    loop_threads = (min(task_threads(opts, facts, call), call.num_tasks)
                    if each and not checkpoint else 1)
    compiled = opts.compile_inner is not False and call.grad and not call.recording
    if call.recording or compiled or not facts.vmappable:  # recorded maps cannot leave a
        vmap = False  # vmap; compiled: the loop's; a model that cannot run under vmap
    elif opts.vectorize == "auto":
        vmap = call.device == "cuda" or not (
            facts.has_conv or (facts.has_attention and loop_threads > 1))
    else:
        vmap = bool(opts.vectorize)
    cs = opts.chunk_size
    backward = "caller"
    if each:
        backward = ("task" if not vmap
                    else "chunk" if cs is not None and cs < call.num_tasks else "caller")
    if not vmap and facts.loop_rewrite:
        norms = "batch_stats"  # no running-stat updates (the loop needs no affine split)
    else:
        norms = "split_affine" if vmap and facts.has_norms else "as_is"
    return Plan(vmap=vmap, backward=backward,
                threads=loop_threads if backward == "task" else 1, checkpoint=checkpoint,
                compiled=compiled, chunk_size=cs if vmap else None,
                math_attention=vmap or second_order, norms=norms)
