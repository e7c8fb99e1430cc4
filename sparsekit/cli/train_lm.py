"""`sparsekit train --model M --dataset D --hook H ...`: from a language model and a text dataset to
a trained, evaluated dictionary in one command (``train.run`` hands over when --model is given).

    python -m sparsekit train --model smollm2-135m --dataset corpus/ --hook blocks.3.hook_resid_post \\
        --n-latents 4096 --k 32 --total-tokens 2e6 --out runs/l3
    python -m sparsekit train --model ./my-hf-model --dataset data.jsonl --text-field body \\
        --input-hook model.layers.2.mlp:input --hook model.layers.2.mlp --n-latents 2048 --k 16 --out runs/tc

Steps: the dataset is opened lazily (``activations.datasets``) and tokenised with the model's
tokenizer into --context-len contexts (BOS first, documents separated by EOS); the first
--eval-contexts contexts are held out, then contexts are read until they give the training rows
(--total-tokens plus the trainer's --eval-tokens; a shorter dataset is repeated). Activations are
streamed through ``LMActivationSource``'s shuffle buffer, or cached once as shards with --cache.
Positions holding special tokens (BOS, EOS, pad, ...) are dropped everywhere unless
--no-exclude-special-tokens (position 0 always is).

Evaluation on the held-out contexts: FVU, explained variance, L0, dead and dense latents at the kept
positions; CE loss recovered and KL when the dictionary's output replaces the activation (the kept
positions only; position 0 and special tokens stay clean), against zero-ablating it
(``analysis.lm_metrics.evaluate_splices`` for smollm2-135m; for a Hugging Face model the same with
forward hooks here, when the hook path names one module). The run folder --out holds the dictionary
(``sae.save``: cfg.json with ``sae.metadata`` naming the model, hooks, dataset, context length and
the special-token setting), metrics.jsonl from training, metrics.json, the feature report
``<name>_features.json`` and ``dashboard.html`` (for either kind of model: ``analysis.lm_models``).
"""
from __future__ import annotations

import difflib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from sparsekit._util.bounded import load_json

from .train_common import PROG, UsageError, hyperparameter_flags, make_dictionary, one_line, prepare, train_and_save

CONTEXT_LEN, EVAL_CONTEXTS = 128, 32
CACHE_DTYPES = ("float32", "float16", "bfloat16")
METRICS_JSON = "metrics.json"
LENS_MODELS = ("smollm2-135m",)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_settings(settings: dict) -> None:
    context_len = settings.setdefault("context_len", CONTEXT_LEN)
    if context_len < 3:
        raise UsageError(f"--context-len must be an int >= 3 (BOS, one input, one predicted token), got {context_len}")
    if settings.setdefault("eval_contexts", EVAL_CONTEXTS) < 1:
        raise UsageError(f"--eval-contexts must be a positive int, got {settings['eval_contexts']}")
    if "cache_dtype" in settings:
        if "cache" not in settings:
            raise UsageError("--cache-dtype applies with --cache DIR (the folder the shards are cached in)")
        if settings["cache_dtype"] not in CACHE_DTYPES:
            raise UsageError(f"--cache-dtype must be one of {', '.join(CACHE_DTYPES)}, got {settings['cache_dtype']!r}")
    if settings.get("cache") and Path(settings["cache"]).is_file():
        raise UsageError(f"--cache {settings['cache']} is a file, not a folder")
    if not settings.get("text_field", "text").strip():
        raise UsageError("--text-field must name a field, got an empty string")
    if "input_hook" not in settings:
        for name in ("transcoder", "skip"):
            if settings.get(name):
                raise UsageError(f"{_flag(name)} with --model needs --input-hook: the activation the transcoder "
                                 f"reads (it predicts --hook's)")


# --- the model ----------------------------------------------------------------------------------------

def load_model(name: str, device, progress: bool = True):
    """(model, tokenizer, kind): smollm2-135m as a HookedTransformer ("lens"), or a local Hugging Face
    model folder with AutoModelForCausalLM and its tokenizer, offline ("hf")."""
    if name in LENS_MODELS:
        from sparsekit.activations.lm import load_lm
        try:
            model = load_lm(name, device=str(device))
        except (FileNotFoundError, ValueError, ImportError) as error:
            raise UsageError(f"--model {name}: {one_line(error)}") from None
        return model, model.tokenizer, "lens"
    folder = Path(name)
    if not folder.is_dir():
        raise UsageError(f"--model {name}: neither a known model ({', '.join(LENS_MODELS)}) nor a folder "
                         f"(a Hugging Face model saved with save_pretrained)")
    if not (folder / "config.json").is_file():
        raise UsageError(f"--model {name}: the folder has no config.json: not a Hugging Face model folder")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder only: never the network
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"--model {name}: cannot load it with transformers ({one_line(error)})") from None
    return model.to(device).eval(), tokenizer, "hf"


def check_model_hooks(model, kind: str, hooks: tuple[str, ...], flags: tuple[str, ...]) -> None:
    """Each hook must exist: a hook point of the HookedTransformer, a module path of the HF model;
    a UsageError naming the flag and the closest names otherwise."""
    for hook, flag in zip(hooks, flags):
        if kind == "lens":
            names = list(model.hook_dict)
            if hook not in names:
                close = difflib.get_close_matches(hook, names, n=4, cutoff=0.5)
                hint = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(names[:4])}"
                raise UsageError(f"{flag} {hook!r} is not a hook point of {model.cfg.model_name}; {hint}")
        else:
            from sparsekit.activations.hf import find_modules, split_side
            try:
                find_modules(model, split_side(hook)[0])
            except ValueError as error:
                raise UsageError(f"{flag} {one_line(error)}") from None


# --- text -> contexts ---------------------------------------------------------------------------------

def open_dataset(settings: dict):
    from sparsekit.activations.datasets import TextDataset
    try:
        return TextDataset(settings["dataset"], text_field=settings.get("text_field", "text"),
                           document_per_line=bool(settings.get("document_per_line")))
    except (ValueError, OSError) as error:
        raise UsageError(f"--dataset: {one_line(error)}") from None


def contexts(dataset, tokenizer, settings: dict, training_rows: int, special: tuple, progress: bool):
    """(held-out contexts [E, T], training contexts [N, T]) read from the dataset's start; reading
    stops once the training contexts give training_rows rows."""
    from tqdm.auto import tqdm

    from sparsekit.activations.datasets import iter_contexts, take_contexts

    length, wanted = settings["context_len"], settings["eval_contexts"]
    stream = iter_contexts(dataset, tokenizer, length)
    with tqdm(unit="tok", unit_scale=True, dynamic_ncols=True, desc="tokenising", disable=not progress) as bar:
        try:
            held_out = take_contexts(stream, count=wanted, progress=bar)
            training = take_contexts(stream, rows=training_rows, special_ids=special, progress=bar)
        except (ValueError, OSError) as error:
            raise UsageError(f"--dataset: {one_line(error)}") from None
    where = " ".join(settings["dataset"])
    if held_out.shape[0] == 0:
        raise UsageError(f"--dataset {where} holds no text to make one context of --context-len {length} tokens "
                         f"(an empty dataset, or documents all empty)")
    if held_out.shape[0] < wanted or training.shape[0] == 0:
        raise UsageError(f"--dataset {where} gives {held_out.shape[0] + training.shape[0]} contexts of --context-len "
                         f"{length} tokens; --eval-contexts {wanted} holds out the first ones and leaves none to "
                         f"train on: lower --eval-contexts or --context-len, or add text")
    return held_out, training


def special_ids_for(settings: dict, tokenizer, newest) -> tuple[int, ...]:
    """The special token ids dropped anywhere in a context: the tokenizer's, unless
    --no-exclude-special-tokens, or a resumed run whose source state recorded none (position 0 only:
    the behaviour it was trained with)."""
    from sparsekit.activations.text import special_token_ids

    if not settings.get("exclude_special_tokens", True):
        return ()
    if newest is not None:
        try:
            from sparsekit.training.checkpoint import STATE_JSON, STATE_JSON_LIMIT
            state = load_json(Path(newest) / STATE_JSON, STATE_JSON_LIMIT, what="run state").get("source_state", {})
        except (OSError, ValueError, AttributeError):  # a RefusedFile (too big, too deep) is a ValueError
            state = {}
        state = state if isinstance(state, dict) else {}
        if state.get("kind") == "LMActivationSource" and "special_ids" not in state:
            return ()
    return special_token_ids(tokenizer)


def training_source(model, training: Tensor, hooks: tuple, settings: dict, cfg, special: tuple):
    """The training rows: streamed through LMActivationSource's shuffle buffer, or cached with --cache
    -> (source, rows per pass over the contexts, d_in, d_out or None)."""
    from sparsekit.activations.store import LMActivationSource, cache_activations

    try:
        if settings.get("cache"):
            shards = cache_activations(model, training, hooks, settings["cache"], batch_size=cfg.batch_size,
                                       dtype=settings.get("cache_dtype", "float32"), progress=cfg.progress,
                                       special_ids=special, seed=cfg.seed, shuffle=True, epochs=None)
            return shards, shards.tokens, shards.d, shards.d_out  # 16-bit batches: the trainer widens them
        source = LMActivationSource(model, training, hooks, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                                    epochs=None, special_ids=special)
        return source, source.rows, source.d, source.d_out
    except ValueError as error:
        raise UsageError(one_line(error)) from None


# --- evaluation ---------------------------------------------------------------------------------------

@torch.no_grad()
def reconstruction_metrics(sae, source, progress: bool = False) -> dict:
    """FVU, explained variance, L0, dead and dense latents over every row of source (x or (x, y)
    batches; one pass): {"fvu", "explained_variance", "l0", "dead_frac", "dead_latents", "dense_frac", "tokens"}.
    FVU = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 with the dictionary's scales applied and undone."""
    from tqdm.auto import tqdm

    from sparsekit.training.metrics import DENSE_THRESHOLD

    was_training = sae.training
    sae.eval()
    sq_err, total, total_sq, rows = 0.0, None, None, 0
    fires = torch.zeros(sae.n_latents, dtype=torch.int64)
    try:
        for batch in tqdm(source, desc="evaluating FVU, L0", unit="batch", disable=not progress, dynamic_ncols=True):
            x, y = batch if isinstance(batch, tuple) else (batch, batch)
            x = x.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
            target = y.to(sae.W_enc.device).double()
            scaled = x * sae.input_scale
            codes = sae.encode(scaled)
            prediction = sae.output(codes, scaled).double() / sae.output_scale
            sq_err += float((prediction - target).pow(2).sum())
            total = target.sum(0) if total is None else total + target.sum(0)
            total_sq = target.pow(2).sum(0) if total_sq is None else total_sq + target.pow(2).sum(0)
            fires += sae.fire_counts(codes).cpu()
            rows += x.shape[0]
    finally:
        sae.train(was_training)
    if rows == 0:
        raise UsageError("the held-out contexts give no activation rows (every position is a special token)")
    variance = float((total_sq - total.pow(2) / rows).sum())
    fvu = sq_err / max(variance, 1e-30)
    density = fires.double() / rows
    return {"fvu": fvu, "explained_variance": 1.0 - fvu, "l0": float(fires.sum()) / rows,
            "dead_frac": float((fires == 0).double().mean()), "dead_latents": int((fires == 0).sum()),
            "dense_frac": float((density > DENSE_THRESHOLD).double().mean()), "n_latents": sae.n_latents,
            "tokens": rows}


def _hf_module(model, path: str):
    from sparsekit.activations.hf import find_modules, split_side

    name, side = split_side(path)
    names = find_modules(model, name)
    if len(names) != 1:
        raise ValueError(f"{path!r} matches {len(names)} modules; splicing replaces one")
    return model.get_submodule(names[0]), side


@contextmanager
def _on_activation(module, side: str, change):
    """Within the block, module's output (side "output": a tensor, or a tuple's first element) or input
    (side "input": its first positional argument, or hidden_states) goes through change(act) -> new act."""
    if side == "output":
        def hook(mod, args, out):
            if isinstance(out, Tensor):
                return change(out)
            return (change(out[0]), *out[1:])
        handle = module.register_forward_hook(hook)
    else:
        def hook(mod, args, kwargs):
            if args:
                return (change(args[0]), *args[1:]), kwargs
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            return args, {**kwargs, key: change(kwargs[key])}
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def hf_splice_metrics(model, tokens: Tensor, sae, hook: str, input_hook: str | None = None, special_ids=(),
                      batch_contexts: int = 8, progress: bool = False) -> dict:
    """CE loss recovered and KL of a dictionary spliced into a transformers model, with forward hooks:
    {"ce_clean", "ce_splice", "ce_zero", "ce_recovered", "kl", "kl_zero"} over tokens [N, T] (T >= 3).

    Spliced pass: the activation at hook (a module path, ':input' allowed, one module) is replaced by
    the dictionary's output (an SAE's reconstruction of it; a transcoder's prediction from the same
    pass's activation at input_hook); zero-ablated pass: by zeros. Only kept positions are changed
    (position 0 and special_ids stay clean, as they were left out of training). CE and KL (clean ||
    intervened, nats) are means over the predictions at positions 1..T-2, as in lm_metrics."""
    from tqdm.auto import tqdm

    from sparsekit.activations.text import kept_positions
    from sparsekit.analysis.splice import loss_recovered

    target, target_side = _hf_module(model, hook)
    source = _hf_module(model, input_hook) if input_hook is not None else None
    device = next(model.parameters()).device
    was_training = sae.training
    sae.eval()
    sums = {"clean": 0.0, "splice": 0.0, "zero": 0.0, "kl": 0.0, "kl_zero": 0.0}
    count = 0

    def dictionary(x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
        return sae.reconstruct(flat).reshape(*x.shape[:-1], -1).to(device=x.device, dtype=x.dtype)

    try:
        for first in tqdm(range(0, tokens.shape[0], batch_contexts), desc="CE/KL (clean, zero, spliced)",
                          disable=not progress, dynamic_ncols=True):
            batch = tokens[first:first + batch_contexts].to(device)
            keep = kept_positions(batch, special_ids).to(device)[..., None]
            targets = batch[:, 2:, None]

            def log_probs() -> Tensor:
                return model(batch).logits[:, 1:-1].double().log_softmax(-1)

            clean = log_probs()
            clean_p = clean.exp()
            with _on_activation(target, target_side, lambda act: torch.where(keep, torch.zeros_like(act), act)):
                zero = log_probs()
            captured: list[Tensor] = []
            if source is None:
                with _on_activation(target, target_side, lambda act: torch.where(keep, dictionary(act), act)):
                    spliced = log_probs()
            else:
                def remember(act):
                    captured[:] = [act]
                    return act
                with _on_activation(*source, remember), \
                        _on_activation(target, target_side,
                                       lambda act: torch.where(keep, dictionary(captured[0]).to(act.dtype), act)):
                    spliced = log_probs()
            sums["clean"] -= float(clean.gather(-1, targets).sum())
            sums["zero"] -= float(zero.gather(-1, targets).sum())
            sums["splice"] -= float(spliced.gather(-1, targets).sum())
            sums["kl"] += float((clean_p * (clean - spliced)).sum())
            sums["kl_zero"] += float((clean_p * (clean - zero)).sum())
            count += batch.shape[0] * (batch.shape[1] - 2)
    finally:
        sae.train(was_training)
    clean, spliced, zero = sums["clean"] / count, sums["splice"] / count, sums["zero"] / count
    try:
        recovered = loss_recovered(clean, spliced, zero)
    except ValueError:  # zero-ablating changed nothing: the ratio is undefined
        recovered = float("nan")
    return {"ce_clean": clean, "ce_splice": spliced, "ce_zero": zero, "ce_recovered": recovered,
            "kl": sums["kl"] / count, "kl_zero": sums["kl_zero"] / count}


def evaluate(model, kind: str, sae, held_out: Tensor, settings: dict, special: tuple, progress: bool) -> dict:
    """Every metric on the held-out contexts, plus "splice": which CE/KL computation ran (or why none)."""
    from sparsekit.activations.store import LMActivationSource

    hook, input_hook = settings["hook"], settings.get("input_hook")
    hooks = (input_hook, hook) if input_hook else (hook,)
    rows = LMActivationSource(model, held_out, hooks, batch_size=4096, shuffle=False, epochs=1, special_ids=special)
    metrics = {"contexts": int(held_out.shape[0]), **reconstruction_metrics(sae, rows, progress)}
    if kind == "lens":
        from sparsekit.analysis.lm_metrics import Splice, evaluate_splices
        spliced = evaluate_splices(model, held_out, {"sae": Splice(sae, hook, input_hook)}, progress=progress,
                                   special_ids=special)["sae"]
        metrics.update({key: spliced[key] for key in ("ce_clean", "ce_splice", "ce_zero", "ce_recovered", "kl",
                                                      "kl_zero")})
        metrics["splice"] = ("analysis.lm_metrics.evaluate_splices: kept positions replaced (position 0 and special "
                             "tokens clean); CE/KL over the predictions at positions 1..T-2")
        return metrics
    try:
        metrics.update(hf_splice_metrics(model, held_out, sae, hook, input_hook, special, progress=progress))
        metrics["splice"] = ("forward hooks on the Hugging Face model: kept positions replaced (position 0 and "
                             "special tokens clean); CE/KL over the predictions at positions 1..T-2")
    except ValueError as error:
        metrics["splice"] = f"not computed: {one_line(error)}"
    return metrics


# --- the feature report ------------------------------------------------------------------------------

def write_report(model, tokenizer, sae, held_out: Tensor, settings: dict, out: Path, name: str,
                 training: dict, special: tuple = (), metrics: dict | None = None) -> tuple[Path, dict]:
    """The feature report (``lm_features.feature_report`` on the held-out contexts) as
    out/<name>_features.json and the dashboard out/dashboard.html -> (the dashboard's path, the report's
    census: features, dead, reported, single_token, context). model: the
    HookedTransformer or the transformers model (with its tokenizer), both read through
    ``analysis.lm_models`` (top contexts from the hook's activations, logit effects through the
    unembedding). training: the dashboard's "dead at end of training" ({dead_frac, step, tokens,
    dead_window_tokens}); metrics: the held-out evaluation, for the summary row (FVU, L0, CE, KL)."""
    from sparsekit.analysis.dashboard import dashboard_from_run, save_report
    from sparsekit.analysis.lm_features import feature_report
    from sparsekit.analysis.lm_models import as_lm

    hook, input_hook = settings["hook"], settings.get("input_hook")
    report = feature_report(as_lm(model, tokenizer), sae, held_out, input_hook or hook, output_hook=hook,
                            special_ids=special)
    report["training"] = training
    if metrics is not None:
        report["metrics"] = {key: value for key, value in metrics.items()  # NaN (CE recovered undefined) left out
                             if isinstance(value, (int, float)) and math.isfinite(value)}
    save_report(report, out, name)
    return dashboard_from_run(out), report["census"]


# --- the run ------------------------------------------------------------------------------------------

def run(settings: dict):
    """--model/--dataset: check, tokenise, train, save, evaluate, report. Returns (TrainResult, out)."""
    _check_settings(settings)
    cfg, out, resume, newest, device = prepare(settings)
    dataset = open_dataset(settings)
    model, tokenizer, kind = load_model(settings["model"], device, cfg.progress)
    hook, input_hook = settings["hook"], settings.get("input_hook")
    hooks = (input_hook, hook) if input_hook else (hook,)
    check_model_hooks(model, kind, hooks, ("--input-hook", "--hook") if input_hook else ("--hook",))
    special = special_ids_for(settings, tokenizer, newest)
    held_out, training = contexts(dataset, tokenizer, settings, cfg.total_tokens + cfg.eval_tokens, special,
                                  cfg.progress)
    source, rows, d_in, d_out = training_source(model, training, hooks, settings, cfg, special)
    if newest is None and cfg.eval_tokens >= rows:
        raise UsageError(f"--eval-tokens {cfg.eval_tokens} would hold out all {rows} training rows the dataset "
                         f"gives; lower it (e.g. --eval-tokens {rows // 10}) or pass --eval-tokens 0")
    sae = make_dictionary(settings, cfg, d_in, d_out, device, newest, resume)
    sae.metadata.update(model=settings["model"], hook=hook, input_hook=input_hook, dataset=dataset.describe(),
                        context_len=settings["context_len"], exclude_special_tokens=bool(special))

    what = ("skip transcoder" if settings.get("skip") else "transcoder") if d_out is not None else "SAE"
    hyper = " ".join(f"{name}={settings[name]}" for name in hyperparameter_flags() if name in settings)
    passes = (cfg.total_tokens + cfg.eval_tokens) / rows
    print(f"{PROG}: {settings['architecture']} {what} n_latents={sae.n_latents} {hyper} on {settings['model']} "
          f"{' -> '.join(hooks)} (d_in={d_in}{f' d_out={d_out}' if d_out else ''}); {training.shape[0]:,} contexts "
          f"of {settings['context_len']} tokens give {rows:,} rows" + (f" (read {passes:.1f} times)" if passes > 1
                                                                       else "")
          + f"; {held_out.shape[0]} more held out; {cfg.total_tokens // cfg.batch_size:,} steps of {cfg.batch_size} "
            f"on {device}", flush=True)
    result, out = train_and_save(sae, source, cfg, resume, out, quiet=True)
    trained = result.sae.gather() if getattr(result.sae, "latent_sharded", False) else result.sae

    metrics = evaluate(model, kind, trained, held_out, settings, special, cfg.progress)
    name = "transcoder" if d_out is not None else "sae"
    end_of_training = {key: result.metrics[key] for key in ("dead_frac", "step", "tokens") if key in result.metrics}
    dashboard, census = write_report(model, tokenizer, trained, held_out, settings, out, name,
                             {**end_of_training, "dead_window_tokens": cfg.dead_window_tokens}, special, metrics)
    record = {"model": settings["model"], "hook": hook, "input_hook": input_hook, "dataset": dataset.describe(),
              "context_len": settings["context_len"], "exclude_special_tokens": bool(special),
              "special_ids": list(special), "training": result.metrics, "evaluation": metrics}
    from sparsekit._util.atomic import atomic_write_bytes
    atomic_write_bytes(out / METRICS_JSON, (json.dumps(record, indent=1, default=str) + "\n").encode())
    _summary(settings, what, out, metrics, dashboard, result.metrics, census)
    return result, out


def _summary(settings: dict, what: str, out: Path, metrics: dict, dashboard: Path, trained: dict,
             census: dict | None = None) -> None:
    dataset = " ".join(settings["dataset"])
    lines = [f"{PROG}: trained a {settings['architecture']} {what} on {settings['model']} "
             f"{settings.get('input_hook') + ' -> ' if settings.get('input_hook') else ''}{settings['hook']} over "
             f"{trained.get('tokens', 0):,} tokens of {dataset}",
             f"  dictionary: {out} (sparsekit.load); metrics: {out / METRICS_JSON}; dashboard: {dashboard}"
             + (f" ({census['reported']} features shown: {census['single_token']} single-token, {census['context']} "
                f"context-dependent; {census['dead']} of {census['features']} never fired on the held-out tokens)"
                if census else ""),
             f"  held out ({metrics['contexts']} contexts, {metrics['tokens']:,} tokens): FVU {metrics['fvu']:.4f} "
             f"(explained variance {metrics['explained_variance']:.4f}), L0 {metrics['l0']:.2f}, dead latents "
             f"{metrics['dead_latents']} of {metrics['n_latents']}"]
    if "ce_recovered" in metrics:
        lines.append(f"  spliced: CE loss recovered {metrics['ce_recovered']:.4f} (clean {metrics['ce_clean']:.4f}, "
                     f"spliced {metrics['ce_splice']:.4f}, zero-ablated {metrics['ce_zero']:.4f}), KL "
                     f"{metrics['kl']:.4f} nats (zero-ablated {metrics['kl_zero']:.4f})")
    else:
        lines.append(f"  spliced: CE/KL {metrics['splice']}")
    from sparsekit.training.metrics import worse_than_trivial

    lines += [f"WARNING: {text}; train longer, change the sparsity or check the hook"
              for text in worse_than_trivial(metrics)]
    print("\n".join(lines), flush=True)
