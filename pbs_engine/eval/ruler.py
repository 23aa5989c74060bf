"""RULER through lm-evaluation-harness against `pbs-engine serve`: one server per method, one lm-eval run per
(task, length) cell, its accuracy and the mean prefill density of its requests (read from the server's /metrics)."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pbs_engine.eval.served import ServedModel

# lm-eval 0.4.13's RULER tasks that build their samples from the model's tokenizer alone
OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
ESSAYS = "Paul Graham's essays (the Hugging Face dataset baber/paul_graham_essays) for the haystack"
DOWNLOADING_TASKS = {**dict.fromkeys(("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multiquery",
                                      "niah_multivalue"), ESSAYS),
                     "ruler_qa_squad": "the SQuAD v2 questions", "ruler_qa_hotpot": "the HotpotQA questions"}
# lm-eval appends RULER's answer prefix ("The special magic number for X mentioned in the provided text is") to a
# prompt RULER sized to fit `length` with the answer (up to 50 tokens over with Qwen2.5's tokenizer, niah_multikey_3
# and ruler_fwe): the server gets this much room beyond the longest length, and where the model's context has no
# such room the samples are sized this much shorter
HEADROOM = 256
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def task_names(spec: str | None) -> list[str]:
    """--tasks as lm-eval names (vt, cwe and fwe may drop their ruler_ prefix); tasks needing downloads are refused."""
    if not spec:
        return list(OFFLINE_TASKS)
    names = []
    for given in filter(None, spec.split(",")):
        name = given if given.startswith("niah") or given.startswith("ruler_") else f"ruler_{given}"
        if name in DOWNLOADING_TASKS:
            raise ValueError(f"--tasks {given}: lm-eval downloads {DOWNLOADING_TASKS[name]} at run time; run it with "
                             f"lm_eval itself on a machine with network access (docs/eval.md). Offline tasks: "
                             f"{', '.join(OFFLINE_TASKS)}")
        if name not in OFFLINE_TASKS:
            raise ValueError(f"--tasks {given}: not a RULER task of lm-eval 0.4.13; offline tasks: "
                             f"{', '.join(OFFLINE_TASKS)}")
        names.append(name)
    return names


def method_flags(name: str) -> list[str]:
    """`pbs-engine serve` flags of a method: dense, pbs (as configured), pbs-budgetNN (keep NN% of the key
    blocks), pbs-tX (threshold X)."""
    if name in ("dense", "pbs"):
        return ["--attention", name]
    budget = re.fullmatch(r"pbs-budget(\d+(?:\.\d+)?)", name)
    if budget and 0 < float(budget[1]) <= 100:
        return ["--attention", "pbs", "--pbs-budget", f"{float(budget[1]) / 100:g}"]
    threshold = re.fullmatch(r"pbs-t(\d*\.?\d+)", name)
    if threshold and 0 < float(threshold[1]) <= 1:
        return ["--attention", "pbs", "--pbs-threshold", threshold[1]]
    raise ValueError(f"--methods {name}: choose dense, pbs, pbs-budgetNN (keep NN% of the key blocks, e.g. "
                     f"pbs-budget10) or pbs-tX (PBS threshold X, e.g. pbs-t0.9)")


def server_max_len(lengths: list[int], model_dir: Path, max_model_len: int | None) -> int:
    """The server's max_model_len: the longest length plus HEADROOM, within the model's context."""
    from pbs_engine.models.config import ModelConfig

    if not lengths or min(lengths) < 1:
        raise ValueError(f"--lengths {lengths}: give positive token counts, e.g. 4096,8192")
    context = ModelConfig.from_dir(model_dir).max_position_embeddings
    beyond = [n for n in lengths if n > context]
    if beyond:
        raise ValueError(f"--lengths {','.join(map(str, beyond))}: beyond the model's context of {context} tokens "
                         f"(max_position_embeddings in {model_dir / 'config.json'})")
    if max_model_len is not None and max_model_len < max(lengths):
        raise ValueError(f"--max-model-len {max_model_len} is shorter than the longest of --lengths ({max(lengths)})")
    if max_model_len is not None and max_model_len <= HEADROOM:
        raise ValueError(f"--max-model-len {max_model_len}: leaves no room for samples; RULER's answer prefix and "
                         f"answer take up to {HEADROOM} tokens")
    if max_model_len is not None and max_model_len > context:
        raise ValueError(f"--max-model-len {max_model_len}: beyond the model's context of {context} tokens "
                         f"(max_position_embeddings in {model_dir / 'config.json'})")
    return max_model_len or min(context, max(lengths) + HEADROOM)


def sample_length(length: int, max_len: int) -> int:
    """The length RULER sizes a cell's samples to: `length`, or less where the answer prefix and the answer would
    not fit the server's max_len after it."""
    return min(length, max_len - HEADROOM)


def run_ruler(flags: list[str], model_dir: Path, tasks: list[str], lengths: list[int], methods: list[str],
              samples: int | None, max_len: int, out_dir: Path, num_concurrent: int = 1, resume: bool = False) -> dict:
    """Serve the model with `flags` once per method and run every (task, length) cell through lm-eval's
    local-completions model; writes results.json, summary.md and lm-eval's outputs under out_dir/raw/METHOD/.
    With `resume`, the cells a previous run into out_dir finished with the same server flags and sample count are
    read back instead of run again (a method with all its cells done starts no server)."""
    lm_eval, completions_api = _import_lm_eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    serve_flags = {m: [*flags, *method_flags(m), "--no-enable-prefix-caching",  # each request prefills all its
                       "--max-model-len", str(max_len), "--served-model-name", m] for m in methods}  # prompt
    done = {}
    for method in methods:
        serve = serve_flags[method]
        for task in tasks:
            for n in lengths:
                cell = _finished_cell(out_dir / "raw" / method, task, n, serve, samples) if resume else None
                if cell is not None:
                    done[method, task, n] = cell
    todo = {(task, n) for m in methods for task in tasks for n in lengths if (m, task, n) not in done}
    # every cell's samples are generated before any server starts, once, so every method answers the same ones
    sized = sorted({sample_length(n, max_len) for _, n in todo})
    loaded = load_tasks(sorted({task for task, _ in todo}), sized, model_dir, samples) if todo else {}
    cells = []
    for method in methods:
        raw, serve = out_dir / "raw" / method, serve_flags[method]
        if all((method, task, n) in done for task in tasks for n in lengths):
            cells += [done[method, task, n] for task in tasks for n in lengths]
            continue
        with ServedModel(serve, raw / "server.log") as server:
            lm = completions_api(base_url=f"{server.url}/v1/completions", model=method, tokenizer=str(model_dir),
                                 tokenizer_backend="huggingface", tokenized_requests=False, max_length=max_len,
                                 num_concurrent=num_concurrent, max_retries=1, timeout=3600)
            for task in tasks:
                for n in lengths:
                    if (method, task, n) in done:
                        cells.append(done[method, task, n])
                        continue
                    cell = _run_cell(lm_eval, lm, server, *loaded[task, sample_length(n, max_len)], method, task,
                                     n, sample_length(n, max_len), samples, raw)
                    (raw / f"cell_{task}_{n}.json").write_text(json.dumps({**cell, "serve": serve,
                                                                           "samples_asked": samples}))
                    cells.append(cell)
    results = {"suite": "ruler", "model": str(model_dir), "lm_eval": lm_eval.__version__, "tasks": tasks,
               "lengths": lengths, "samples": samples, "max_model_len": max_len,
               "methods": {m: method_flags(m) for m in methods}, "serve_flags": flags, "cells": cells}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "summary.md").write_text(summary(results))
    return results


def _import_lm_eval():
    try:
        import lm_eval
        import nltk
        import wonderwords  # noqa: F401  (cwe and the niah word keys)
        from lm_eval.models.openai_completions import LocalCompletionsAPI
    except ImportError as e:
        raise OSError(f"--suite ruler needs lm-eval 0.4.13 and wonderwords: pip install 'pbs-engine[eval]' ({e})"
                      ) from e
    _fingerprint_fallback()
    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:  # lm-eval fetches it when its niah module is imported; only the essay tasks split sentences
        nltk.download = lambda *args, **kwargs: False
    return lm_eval, LocalCompletionsAPI


def sample_cache(task: str, length: int, model_dir: Path, samples: int | None) -> Path:
    """Where the generated samples of one cell are kept: keyed by lm-eval's version, the task, the length, the
    tokenizer's files and the sample count (RULER draws them from a fixed seed, so the key fixes the samples)."""
    import lm_eval

    from pbs_engine.engine.model_source import cache_root

    digest = hashlib.sha256(f"{lm_eval.__version__}|{task}|{length}|{samples}|{_tokenizer_digest(model_dir)}".encode())
    return cache_root() / "ruler" / f"{task}-{length}-{samples or 'all'}-{digest.hexdigest()[:16]}"


@functools.lru_cache(maxsize=None)
def _tokenizer_digest(model_dir: Path) -> str:
    """The tokenizer files' hash, read once per model directory (tokenizer.json runs to megabytes)."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            digest.update(name.encode() + (model_dir / name).read_bytes())
    return digest.hexdigest()


def load_tasks(tasks: list[str], lengths: list[int], model_dir: Path, samples: int | None,
               workers: int | None = None) -> dict:
    """(task, length) -> (task manager, lm-eval task) for every cell. lm-eval's RULER builds 500 samples per cell
    whatever --limit, tokenising haystacks in one thread (about a minute per task at 32K): the cells missing from
    the cache are generated in parallel subprocesses (at most `workers` at once), each keeping its first `samples` on disk (sample_cache), and
    every task is then built from its cell's files, so a rerun (or a second method) generates nothing."""
    cells = [(task, n) for task in tasks for n in lengths]
    missing = [(t, n) for t, n in cells if not sample_cache(t, n, model_dir, samples).is_dir()]
    if len(missing) == 1:
        _generate_cell(*missing[0], model_dir, samples)
    elif missing:
        workers = workers or min(len(missing), os.cpu_count() or 1)
        print(f"generating RULER samples for {len(missing)} cells in {workers} processes", file=sys.stderr)
        _generate_cells(missing, model_dir, samples, workers)
    return {(t, n): _load_cached(t, n, model_dir, sample_cache(t, n, model_dir, samples)) for t, n in cells}


_GENERATE_CELL = ("import sys; from pathlib import Path; from pbs_engine.eval.ruler import _generate_cell; "
                  "_generate_cell(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), "
                  "None if sys.argv[4] == 'None' else int(sys.argv[4]))")


def _generate_cells(missing: list[tuple[str, int]], model_dir: Path, samples: int | None, workers: int) -> None:
    """Runs _generate_cell for every cell in its own Python subprocess, at most `workers` at once. A failure kills
    the others and raises with the tail of the failed one's stderr (all of it kept in a .log beside the cache) (plain processes, so that an exception the
    worker could not pickle back does not hide the cause)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    pending = list(missing)
    running: list[tuple[str, int, subprocess.Popen, object]] = []
    try:
        while pending or running:
            while pending and len(running) < workers:
                task, length = pending.pop(0)
                log = sample_cache(task, length, model_dir, samples).with_suffix(".log")
                log.parent.mkdir(parents=True, exist_ok=True)
                err = log.open("w+b")
                proc = subprocess.Popen([sys.executable, "-c", _GENERATE_CELL, task, str(length), str(model_dir),
                                         str(samples)], env=env, stdout=subprocess.DEVNULL, stderr=err)
                running.append((task, length, proc, err))
            time.sleep(0.5)
            for entry in list(running):
                task, length, proc, err = entry
                code = proc.poll()
                if code is None:
                    continue
                running.remove(entry)
                if code != 0:
                    err.seek(0)
                    tail = err.read().decode(errors="replace")[-2000:]
                    err.close()
                    raise RuntimeError(f"RULER sample generation for {task} at {length} tokens failed "
                                       f"(exit {code}; its whole output: {err.name}): {tail}")
                err.close()
    finally:
        for _, _, proc, err in running:
            proc.kill()
            proc.wait()
            err.close()


def _generate_cell(task: str, length: int, model_dir: Path, samples: int | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process
    _import_lm_eval()
    _, task_obj = _load_task(task, length, model_dir)
    # the rows as JSON, not datasets' save_to_disk: its dill fingerprinting fails on some pyarrow/Python pairs
    splits = {name: [dict(split[i]) for i in range(min(samples or len(split), len(split)))]
              for name, split in task_obj.dataset.items()}
    target = sample_cache(task, length, model_dir, samples)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "samples.json").write_text(json.dumps(splits))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _load_cached(task: str, length: int, model_dir: Path, path: Path):
    """lm-eval's task built around the samples saved at `path` instead of generating them."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    splits = json.loads((path / "samples.json").read_text())
    original = ConfigurableTask.download

    def download(self, *args, **kwargs) -> None:
        self.dataset = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})

    ConfigurableTask.download = download
    try:
        return _load_task(task, length, model_dir)
    finally:
        ConfigurableTask.download = original


def _fingerprint_fallback() -> None:
    """datasets fingerprints every new Dataset by dill-pickling its state; under Python 3.12 with pyarrow 26 that
    pickling fails on pyarrow's MonthDayNano type (PicklingError inside RULER's Dataset.from_list). A fingerprint
    only names cached transforms, so where it cannot be computed a random one serves, as datasets itself does for
    transforms it cannot hash."""
    import datasets.arrow_dataset as arrow_dataset
    from datasets.fingerprint import generate_random_fingerprint

    original = arrow_dataset.generate_fingerprint
    if getattr(original, "pbs_fallback", False):
        return

    def generate_fingerprint(dataset) -> str:
        try:
            return original(dataset)
        except Exception:  # noqa: BLE001 (any pickling failure)
            return generate_random_fingerprint()

    generate_fingerprint.pbs_fallback = True
    arrow_dataset.generate_fingerprint = generate_fingerprint


def _load_task(task: str, length: int, model_dir: Path):
    """lm-eval's RULER task `task` with samples of `length` tokens, sized with the model's own tokenizer."""
    import lm_eval.tasks
    import numpy as np

    random.seed(0)  # the samplers draw from the global generators
    np.random.seed(0)
    manager = lm_eval.tasks.TaskManager(include_defaults=False,
                                        include_path=str(Path(lm_eval.tasks.__file__).parent / "ruler"),
                                        metadata={"max_seq_lengths": [length], "tokenizer": str(model_dir)})
    return manager, manager.load([task])["tasks"][task]


def _finished_cell(raw: Path, task: str, length: int, serve: list[str], samples: int | None) -> dict | None:
    """The cell a previous run finished with these server flags and this sample count, or None."""
    try:
        cell = json.loads((raw / f"cell_{task}_{length}.json").read_text())
    except (OSError, ValueError):
        return None
    if cell.pop("serve", None) != serve or cell.pop("samples_asked", "none") != samples:
        return None
    return cell


def _run_cell(lm_eval, lm, server: ServedModel, manager, task_obj, method: str, task: str, length: int,
              sized: int, samples: int | None, raw: Path) -> dict:
    from lm_eval.utils import handle_non_serializable

    density_sum, requests = server.density_totals()
    res = lm_eval.simple_evaluate(model=lm, tasks=[task_obj], task_manager=manager, limit=samples, log_samples=True,
                                  bootstrap_iters=0)
    density_sum_after, requests_after = server.density_totals()
    logged = res.pop("samples")[task]
    stem = f"{task}_{length}"
    (raw / f"results_{stem}.json").write_text(json.dumps(res, indent=1, default=handle_non_serializable))
    (raw / f"samples_{stem}.jsonl").write_text(
        "".join(json.dumps(s, default=handle_non_serializable) + "\n" for s in logged))
    served = requests_after - requests
    return {"method": method, "task": task, "length": length, "sample_length": sized,
            "accuracy": res["results"][task][f"{sized},none"], "samples": len(logged), "requests": served,
            "density": (density_sum_after - density_sum) / served if served else None}


def cell_means(results: dict) -> dict:
    """(method, length) -> (mean accuracy, mean density) over the tasks."""
    out = {}
    for method in results["methods"]:
        for n in results["lengths"]:
            cells = [c for c in results["cells"] if c["method"] == method and c["length"] == n]
            densities = [c["density"] for c in cells if c["density"] is not None]
            out[method, n] = (sum(c["accuracy"] for c in cells) / len(cells),
                              sum(densities) / len(densities) if densities else None)
    return out


def summary(results: dict) -> str:
    """One markdown table per method (accuracy % and mean prefill density per cell), then each against dense."""
    lengths, tasks = results["lengths"], results["tasks"]
    cells = {(c["method"], c["task"], c["length"]): (c["accuracy"], c["density"]) for c in results["cells"]}
    cells.update({(m, "mean", n): v for (m, n), v in cell_means(results).items()})
    head = ["| task | " + " | ".join(f"{n}" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    samples = results["samples"] or "all"
    lines = [f"RULER (lm-eval {results['lm_eval']}) against pbs-engine serve, model {results['model']}, samples per "
             f"cell: {samples}. Cells: accuracy % (mean prefill density of the cell's requests).", ""]
    shortened = sorted({(c["length"], c["sample_length"]) for c in results["cells"]
                        if c["sample_length"] < c["length"]})
    if shortened:
        lines += ["Samples sized shorter so that the answer prefix and the answer fit the server's max_model_len "
                  f"{results['max_model_len']}: " + ", ".join(f"{n} -> {m}" for n, m in shortened) + " tokens.", ""]
    for method, flags in results["methods"].items():
        lines += [f"{method}: serve {' '.join(flags)}", "", *head]
        for task in [*tasks, "mean"]:
            lines.append(f"| {task} | " + " | ".join(_cell(*cells[method, task, n]) for n in lengths) + " |")
        lines.append("")
    for method in results["methods"]:
        if method == "dense" or "dense" not in results["methods"]:
            continue
        lines += [f"{method} minus dense, accuracy points", "", *head]
        for task in [*tasks, "mean"]:
            diffs = [100 * (cells[method, task, n][0] - cells["dense", task, n][0]) for n in lengths]
            lines.append(f"| {task} | " + " | ".join(f"{d:+.1f}" for d in diffs) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(accuracy: float, density: float | None) -> str:
    return f"{100 * accuracy:.1f} ({density:.2f})" if density is not None else f"{100 * accuracy:.1f} (-)"
