"""Grain input pipeline: manifests -> fixed-size, bucketed, padded numpy batches.

    data = ManifestData(config.data)            # config.data: data/config.py default_data_config()
    it = data.train_iterator()                   # next(it) -> batch; it.get_state() / set_state()
    for batch in data.eval_batches(): ...
    data.stats()                                 # {'skipped/<reason>': n, 'filtered/<reason>': n}

How a batch is made (all of it a pure function of the config, the manifests and the batch index):
 1. Manifests are read once into `Example`s grouped by task (data/sources.py). Bad lines are
    counted (`errors.DataStats`), audio over `max_audio_seconds` is dropped and counted (or cut
    into windows for `chunk_tasks` when `long_audio='chunk'`), targets over `max_target_tokens`
    are dropped and counted, tasks outside `mix_weights` are counted as `task_not_in_mix`.
 2. The epoch plan (data/plan.py) mixes the tasks, orders them and cuts bucketed batches. A
    partial last batch is padded with masked-out rows (`example_mask=False`), so every step has
    the same batch size.
 3. The global batch is planned identically on every process: audio is padded to the smallest
    `audio_buckets_seconds` entry that holds its longest clip, instruction and target ids to the
    smallest `instruction_buckets` / `target_buckets` entry that holds their longest row. Process
    `p` of `n` then loads rows `[p*B/n, (p+1)*B/n)`; shapes agree across processes, and there are
    at most len(audio) x len(instruction) x len(target) bucket shapes.
 4. The iterator state is the next batch index plus the counters: `set_state` restarts exactly there.
 5. Audio that fails at load time (missing, unreadable, empty, NaN/inf, longer than its manifest
    duration says) turns its row into a masked-out row and is counted; `strict=True` raises
    `DataError` naming the manifest file and line instead.
 6. The tokenizer is loaded once, in the constructing thread, before any reader thread starts.

Batch (numpy; what the train step consumes; B = batch_size / process count):
    audio [B, S] float32, audio_mask [B, S] bool, instruction_ids [B, I] int32,
    instruction_mask [B, I] bool, target_ids [B, T] int32 (each row ends with EOS),
    target_mask [B, T] bool, task_id [B] int32 (index into tasks.TASK_NAMES),
    (decoder-only layout, `TextEncoder(layout='decoder')`: also prefix_ids / prefix_mask [B, P], the
    chat prompt before the audio; instruction_ids then hold the prompt after it, target_ids the
    answer + EOS without BOS; every part right-padded and bucketed by `instruction_buckets`),
    example_mask [B] bool, and `meta` (a dict the train step ignores: epoch, batch, ids, tasks,
    instructions, choices, joint, skipped).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from speechverse_jax.data import tasks as tasks_lib
from speechverse_jax.data.audio import AudioError, load_audio
from speechverse_jax.data.config import mix_weights, plain, validate_config
from speechverse_jax.data.errors import DataStats
from speechverse_jax.data.manifest import Example, read_manifests, split_paths
from speechverse_jax.data.plan import EpochPlan, bucket, plan_epoch
from speechverse_jax.data.sources import Source, build_sources
from speechverse_jax.data.tokenizer import TextEncoder

log = logging.getLogger(__name__)

_PAD_AUDIO_SECONDS = 0.5  # valid (silent) audio in masked-out rows, so no row is fully masked
_ENDLESS = 2**40


@dataclasses.dataclass
class _Row:
    example: Example
    task_id: int
    instruction: str
    target: str
    choice: int
    joint: bool
    descriptions: bool


class BatchLoader:
    """`loader(global_batch_index) -> batch dict` for this process's rows. Picklable."""

    def __init__(self, sources: Dict[str, Source], cfg, encoder: TextEncoder, *, shuffle: bool,
                 weights: Optional[List[float]], total: int, shard_index: int, shard_count: int,
                 prompt_split: str, joint_share: float):
        self.tasks = list(sources)
        self.sources = [sources[t] for t in self.tasks]
        self.encoder = encoder
        self.shuffle, self.weights, self.total = shuffle, weights, total
        self.shard_index, self.shard_count = shard_index, shard_count
        self.batch_size = int(cfg.batch_size)
        self.rows_per_host = self.batch_size // shard_count
        self.seed, self.window = int(cfg.seed), int(cfg.bucket_window)
        self.sr = int(cfg.sample_rate)
        self.audio_buckets = sorted(int(round(s * self.sr)) for s in cfg.audio_buckets_seconds)
        self.instruction_buckets = sorted(int(x) for x in cfg.instruction_buckets)
        self.target_buckets = sorted(int(x) for x in cfg.target_buckets)
        self.max_target = int(cfg.max_target_tokens)
        self.prompt_split = prompt_split
        self.with_labels = None if cfg.with_labels else False
        self.descriptions_share = float(cfg.descriptions_share)
        self.label_overrides = plain(cfg.label_overrides) or {}
        self.joint_tasks = set(cfg.joint_tasks)
        self.joint_share = float(joint_share)
        self.batches_per_epoch = max(int(math.ceil(total / self.batch_size)), 1)
        self._plans: Dict[int, EpochPlan] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_plans"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's plan, cached (the last few epochs) per process; safe across reader threads."""
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = plan_epoch([s.samples for s in self.sources], self.weights, epoch, self.seed,
                                  self.batch_size, self.window, self.shuffle, self.total,
                                  keys=[tasks_lib.task_id(t) for t in self.tasks])
                self._plans[epoch] = plan
                while len(self._plans) > 3:
                    self._plans.pop(min(self._plans))
        return plan

    def _row(self, plan: EpochPlan, p: int) -> _Row:
        s, i = int(plan.source[p]), int(plan.index[p])
        src = self.sources[s]
        ex = src.examples[i]
        choice = int(plan.choice[p])
        joint = bool(src.has_transcript[i] and ex.task in self.joint_tasks and plan.joint_u[p] < self.joint_share)
        desc = bool(plan.desc_u[p] < self.descriptions_share)
        instruction = tasks_lib.build_instruction(
            ex.task, ex, choice, split=self.prompt_split, with_labels=self.with_labels,
            with_descriptions=desc, joint=joint, label_overrides=self.label_overrides)
        target = tasks_lib.format_joint_target(ex.task, ex.fields["transcript"], ex.target) if joint else ex.target
        return _Row(ex, tasks_lib.task_id(ex.task), instruction, target, choice, joint, desc)

    def __call__(self, global_batch: int) -> Dict[str, Any]:
        epoch, j = divmod(int(global_batch), self.batches_per_epoch)
        plan = self.plan(epoch)
        positions = plan.batches[j] if j < len(plan.batches) else np.zeros(0, np.int64)
        rows: List[Optional[_Row]] = [self._row(plan, int(p)) for p in positions]
        rows += [None] * (self.batch_size - len(rows))
        # Shapes from the whole global batch, so every process pads to the same buckets.
        live_rows = [r for r in rows if r is not None]
        prompts = iter(self.encoder.encode_prompts([r.instruction for r in live_rows]))
        targets = iter(self.encoder.encode([r.target for r in live_rows]))
        # per row: (instruction ids, target ids, prefix ids); the prefix is empty in the T5 layout
        tokens = [(lambda p, t: (p[1], t, p[0]))(next(prompts), next(targets)) if r is not None else None
                  for r in rows]
        max_ins, max_tgt = self.instruction_buckets[-1], min(self.max_target, self.target_buckets[-1])
        fits = [t is not None and len(t[0]) <= max_ins and len(t[1]) <= max_tgt and len(t[2]) <= max_ins
                for t in tokens]
        live = [k for k, ok in enumerate(fits) if ok]
        src_samples = [self.sources[int(plan.source[p])].samples[int(plan.index[p])] for p in positions]
        # (the resampling slack never pushes a clip that fits max_audio_seconds past the last bucket)
        n_audio = bucket(min(max([src_samples[k] for k in live], default=1), self.audio_buckets[-1]),
                         self.audio_buckets)
        n_ins = bucket(max([len(tokens[k][0]) for k in live], default=1), self.instruction_buckets)
        n_tgt = bucket(max([len(tokens[k][1]) for k in live], default=1), self.target_buckets)
        with_prefix = self.encoder.layout == "decoder"
        n_pre = bucket(max([len(tokens[k][2]) for k in live], default=1), self.instruction_buckets)

        b = self.rows_per_host
        lo = self.shard_index * b
        eos = self.encoder.eos_id
        pad_audio = min(n_audio, int(_PAD_AUDIO_SECONDS * self.sr))
        out = {
            "audio": np.zeros((b, n_audio), np.float32), "audio_mask": np.zeros((b, n_audio), bool),
            "instruction_ids": np.zeros((b, n_ins), np.int32), "instruction_mask": np.zeros((b, n_ins), bool),
            "target_ids": np.zeros((b, n_tgt), np.int32), "target_mask": np.zeros((b, n_tgt), bool),
            "task_id": np.zeros((b,), np.int32), "example_mask": np.zeros((b,), bool),
        }
        if with_prefix:
            out["prefix_ids"], out["prefix_mask"] = np.zeros((b, n_pre), np.int32), np.zeros((b, n_pre), bool)
        meta = {"epoch": epoch, "batch": j, "global_batch": int(global_batch), "ids": [], "tasks": [],
                "instructions": [], "targets": [], "choices": [], "joint": [], "descriptions": [], "skipped": [],
                "shape": (n_audio, n_ins, n_tgt)}
        for r in range(b):
            k = lo + r
            row, ok = rows[k], fits[k]
            audio = None
            if row is not None and not ok:
                got_ins, got_tgt = len(tokens[k][0]) + len(tokens[k][2]), len(tokens[k][1])
                reason = ("instruction_too_long" if max(len(tokens[k][0]), len(tokens[k][2])) > max_ins
                          else "target_too_long")
                meta["skipped"].append((reason, row.example.where,
                                        f"{got_ins} instruction / {got_tgt} target tokens"))
            elif row is not None:
                audio = self._load(row.example, n_audio, meta["skipped"])
            meta["ids"].append(row.example.id if row is not None else None)
            meta["tasks"].append(row.example.task if row is not None else None)
            meta["instructions"].append(row.instruction if row is not None else None)
            meta["targets"].append(row.target if row is not None else None)
            meta["choices"].append(row.choice if row is not None else None)
            meta["joint"].append(row.joint if row is not None else False)
            meta["descriptions"].append(row.descriptions if row is not None else False)
            if audio is None:  # masked-out row: silent audio, one EOS token, no loss
                out["audio_mask"][r, :pad_audio] = True
                out["instruction_ids"][r, 0] = out["target_ids"][r, 0] = eos
                out["instruction_mask"][r, 0] = out["target_mask"][r, 0] = True
                if with_prefix:
                    out["prefix_ids"][r, 0], out["prefix_mask"][r, 0] = eos, True
                continue
            ins, tgt, pre = tokens[k]
            if with_prefix:
                out["prefix_ids"][r, : len(pre)] = pre
                out["prefix_mask"][r, : len(pre)] = True
            out["audio"][r, : audio.size] = audio
            out["audio_mask"][r, : audio.size] = True
            out["instruction_ids"][r, : len(ins)] = ins
            out["instruction_mask"][r, : len(ins)] = True
            out["target_ids"][r, : len(tgt)] = tgt
            out["target_mask"][r, : len(tgt)] = True
            out["task_id"][r] = row.task_id
            out["example_mask"][r] = True
        out["meta"] = meta
        return out

    def _load(self, ex: Example, max_samples: int, skipped: list) -> Optional[np.ndarray]:
        try:
            audio = load_audio(ex.audio, self.sr, offset=ex.offset if ex.segment else 0.0,
                               duration=ex.duration if ex.segment else None)
        except AudioError as e:
            skipped.append((e.reason, ex.where, str(e)))
            return None
        except Exception as e:  # anything else a decoder throws: still one bad file, not a dead epoch
            skipped.append(("unreadable_audio", ex.where, f"{ex.audio}: {type(e).__name__}: {e}"))
            return None
        if audio.size > max_samples:
            skipped.append(("duration_mismatch", ex.where,
                            f"{ex.audio}: {audio.size / self.sr:.3f}s decoded, manifest says {ex.duration:.3f}s"))
            return None
        return audio


# --------------------------------------------------------------------------------------------
# Pipeline and iterator
# --------------------------------------------------------------------------------------------

def _shard(cfg, shard_index: Optional[int], shard_count: Optional[int], shard_options=None) -> Tuple[int, int]:
    if shard_options is not None:
        return int(shard_options.shard_index), int(shard_options.shard_count)
    idx = shard_index if shard_index is not None else int(cfg.shard_index)
    cnt = shard_count if shard_count is not None else int(cfg.shard_count)
    if idx < 0 or cnt < 0:
        import jax

        idx = jax.process_index() if idx < 0 else idx
        cnt = jax.process_count() if cnt < 0 else cnt
    if not 0 <= idx < cnt:
        raise ValueError(f"shard_index {idx} must be in [0, {cnt})")
    return idx, cnt



class Pipeline:
    """One split (train or eval) of the data: sources, plan, grain dataset and iterators."""

    def __init__(self, manifests, cfg, encoder: TextEncoder, *, train: bool = True,
                 shard_index: Optional[int] = None, shard_count: Optional[int] = None, shard_options=None):
        validate_config(cfg)
        self.cfg, self.encoder, self.train = cfg, encoder, train
        self.shard_index, self.shard_count = _shard(cfg, shard_index, shard_count, shard_options)
        if int(cfg.batch_size) % self.shard_count:
            raise ValueError(f"data.batch_size={cfg.batch_size} must divide by the process count {self.shard_count}")
        self.manifests = split_paths(manifests)
        if not self.manifests:
            raise ValueError(f"no {'train' if train else 'eval'} manifests configured")
        self.build_stats = DataStats(strict=bool(cfg.strict), max_logged=int(cfg.max_logged_errors))
        examples = read_manifests(self.manifests, self.build_stats, label_overrides=plain(cfg.label_overrides) or {},
                                  probe=bool(cfg.probe_durations), check_files=bool(cfg.check_files))
        self.sources = build_sources(examples, cfg, encoder, self.build_stats, use_weights=train)
        if not self.sources:
            raise ValueError(f"no usable examples in {self.manifests}\n{self.build_stats.summary()}")
        weights = None
        mix = mix_weights(cfg) if train else {}
        if mix:
            missing = [t for t, w in mix.items() if w > 0 and t not in self.sources]
            if missing:
                log.warning("mix_weights names tasks without usable examples: %s", missing)
            weights = [mix[t] for t in self.sources]
        n = sum(len(s.examples) for s in self.sources.values())
        total = int(cfg.epoch_examples) if train else 0
        self.epoch_examples = total or n
        self.num_epochs = int(cfg.num_epochs) if train else 1
        self.loader = BatchLoader(
            self.sources, cfg, encoder, shuffle=bool(cfg.shuffle) and train, weights=weights,
            total=self.epoch_examples, shard_index=self.shard_index, shard_count=self.shard_count,
            prompt_split=cfg.prompt_split if train else cfg.eval_prompt_split,
            joint_share=float(cfg.joint_share) if train else 0.0)
        self.batches_per_epoch = self.loader.batches_per_epoch
        if self.build_stats.counts:
            log.info(self.build_stats.summary(f"{'train' if train else 'eval'} manifests"))

    @property
    def num_batches(self) -> Optional[int]:
        return self.batches_per_epoch * self.num_epochs if self.num_epochs > 0 else None

    def shape_bound(self) -> int:
        """How many distinct batch shapes the train step can see (compilations)."""
        c = self.cfg
        return len(c.audio_buckets_seconds) * len(c.instruction_buckets) * len(c.target_buckets)

    def dataset(self, start: int = 0):
        """The grain dataset of batches `start, start+1, ...` (threads / workers as configured)."""
        import grain

        stop = self.num_batches if self.num_batches is not None else start + _ENDLESS
        ds = grain.MapDataset.range(start, max(stop, start)).map(self.loader)
        threads = int(self.cfg.read_threads)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=int(self.cfg.prefetch)
                                                  if threads else 0))
        workers = int(self.cfg.worker_count)
        if workers > 0:
            _absl_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                             per_worker_buffer_size=int(self.cfg.worker_buffer)))
        return ds

    def iterator(self) -> "BatchIterator":
        return BatchIterator(self)


def _absl_parsed() -> None:
    """grain workers read absl flags; outside absl.app.run they must be marked parsed."""
    try:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    except ImportError:  # pragma: no cover
        pass


class BatchIterator:
    """Batches of a `Pipeline`, with exact `get_state()` / `set_state()` and per-epoch summaries.

    State (JSON-able): {'next_batch': global batch index, 'counts': load-time skips so far,
    'epoch_counts': load-time skips in the current epoch}.
    """

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        cfg = pipeline.cfg
        self.stats = DataStats(strict=bool(cfg.strict), max_logged=int(cfg.max_logged_errors))
        self.epoch_stats = DataStats(max_logged=int(cfg.max_logged_errors))
        self.epoch_summaries: Dict[int, Dict[str, int]] = {}
        self._start(0)

    def _start(self, index: int) -> None:
        if getattr(self, "_it", None) is not None:
            self.close()
        self.next_batch = int(index)
        self._it = iter(self.pipeline.dataset(self.next_batch))

    def close(self) -> None:
        """Stop prefetch threads / worker processes (a later `set_state` starts new ones)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, Any]:
        batch = next(self._it)
        meta = batch["meta"]
        self.next_batch = meta["global_batch"] + 1
        for reason, where, message in meta["skipped"]:
            self.stats.record(reason, where, message)  # raises DataError when strict
            self.epoch_stats.record(reason, where, message)
        if meta["batch"] == self.pipeline.batches_per_epoch - 1:
            self._end_epoch(meta["epoch"])
        return batch

    def _end_epoch(self, epoch: int) -> None:
        total = self.pipeline.build_stats.copy().merge(self.epoch_stats)
        self.epoch_summaries[epoch] = total.as_dict()
        log.info(total.summary(f"epoch {epoch} data"))
        self.epoch_stats = DataStats(max_logged=self.epoch_stats.max_logged)

    def counts(self) -> Dict[str, int]:
        """Skipped / filtered counts so far: manifest-level (once) plus load-time."""
        return self.pipeline.build_stats.copy().merge(self.stats).as_dict()

    def get_state(self) -> Dict[str, Any]:
        return {"next_batch": self.next_batch, "counts": dict(self.stats.counts),
                "epoch_counts": dict(self.epoch_stats.counts)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if isinstance(state, (bytes, bytearray)):
            import json

            state = json.loads(state.decode("utf-8"))
        cfg = self.pipeline.cfg
        self.stats = DataStats.from_counts(state.get("counts", {}), strict=bool(cfg.strict))
        self.epoch_stats = DataStats.from_counts(state.get("epoch_counts", {}))
        self._start(int(state["next_batch"]))


class ManifestData:
    """What the train loop needs (`train.loop.TrainData`): train iterator, eval batches, stats."""

    def __init__(self, config, tokenizer: Any = None, shard_index: Optional[int] = None,
                 shard_count: Optional[int] = None, shard_options=None, layout: str = "t5"):
        """`layout`: the model's ('t5' or 'decoder', models/composed.py), which decides how prompts
        and targets are tokenized (`TextEncoder`); a given `TextEncoder` brings its own."""
        self.config = config
        self.task_names = list(tasks_lib.TASK_NAMES)
        self.encoder = tokenizer if isinstance(tokenizer, TextEncoder) else TextEncoder(config.tokenizer, tokenizer,
                                                                                        layout=layout)
        self.encoder.tokenizer  # load it here, before grain's reader threads or workers start
        self._shard = dict(shard_index=shard_index, shard_count=shard_count, shard_options=shard_options)
        self.train = Pipeline(config.train_manifests, config, self.encoder, train=True, **self._shard) \
            if split_paths(config.train_manifests) else None
        self._eval: Optional[Pipeline] = None
        self._iterators: List[BatchIterator] = []

    @property
    def eval(self) -> Optional[Pipeline]:
        if self._eval is None and split_paths(self.config.eval_manifests):
            self._eval = Pipeline(self.config.eval_manifests, self.config, self.encoder, train=False, **self._shard)
        return self._eval

    def train_iterator(self) -> BatchIterator:
        if self.train is None:
            raise ValueError("data.train_manifests is empty")
        it = self.train.iterator()
        self._iterators.append(it)
        return it

    def eval_batches(self) -> Iterator[Dict[str, Any]]:
        """One pass over the eval manifests (no shuffling, no joint examples, fixed prompts)."""
        if self.eval is None:
            return iter(())
        return iter(self.eval.iterator())

    def stats(self) -> Dict[str, int]:
        """Counts by reason ('skipped/...' bad input, 'filtered/...' config filters) so far."""
        total = DataStats()
        if self.train is not None:
            total.merge(self.train.build_stats)
        for it in self._iterators:
            total.merge(it.stats)
        out = total.as_dict()
        if self._eval is not None:
            out.update({f"eval/{k}": v for k, v in self._eval.build_stats.as_dict().items()})
        return out
