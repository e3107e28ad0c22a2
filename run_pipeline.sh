#!/usr/bin/env bash
# One entry point for a newcomer.
#   ./run_pipeline.sh          set up .venv, build the embedded demo, extract it with the untrained tiny vision
#                              presets, train text-only (bert-crf), afdvqf, mango and ifaformer with the bundled
#                              MiniLM, print a results table, write a case-study page of the posts where text-only
#                              and afdvqf differ
#   ./run_pipeline.sh classify set up .venv, build the seeded MVSA-style sentiment demo, extract it once with the
#                              untrained tiny-resnet, train the classifier text-only, image-only and both (mlp,
#                              attention, xattn, cnn heads) from that one cache, print a table
#   ./run_pipeline.sh test     set up .venv and run the linter and the test suite (what CI runs)
#   ./run_pipeline.sh DATASET --data-root DIR --clip PATH --detector NAME --detector-ckpt FILE
#                     [--text-encoder PATH] [--out DIR] [--epochs N]
#                              the real pipeline on twitter2015 | twitter2017 | newsmkg; --clip and --detector
#                              are required (a real dataset never defaults to the untrained presets)
# Environment: PYTHON (the interpreter that creates the venv; default python3), MNER_VENV (default .venv),
#              MNER_DEMO_OUT (default demo_out; the classify demo writes under $MNER_DEMO_OUT/classify).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${MNER_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating virtual environment $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.mner-installed"
  if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    echo "== installing the project into $VENV"
    # First a current pip: the one an interpreter bundles (Debian 12's python3: pip 23.0.1) can fail to
    # build sdists under a newer setuptools, so the install must not depend on which python3 made the venv.
    # setuptools too: the project is built with the venv's own setuptools (below), so the build back-end
    # is the one whose version is printed, not whatever an isolated build fetches.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip "setuptools>=70.1"
    # These exact versions install from local disk; an unpinned torch would download several GB of CUDA wheels.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
    # setuptools adds an "Editable installation" note to every editable install (it is not about this
    # project's configuration: no folder of the checkout is named like the package, `mner`); it is the
    # only warning left, so it is filtered and any other build warning still shows.
    # First the project with its dependencies, each sdist among them (seqeval) built in pip's isolated
    # environment as its own setup expects (seqeval built without one comes out as version 0.0.0);
    # then the project alone again, built with the venv's setuptools.
    PYTHONWARNINGS="ignore:Editable installation" \
      "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
    PYTHONWARNINGS="ignore:Editable installation" \
      "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
      --force-reinstall -e .
    touch "$stamp"
  else
    echo "== reusing virtual environment $VENV"
  fi
  # The interpreter and the build tools the install (and so every number this run prints) was made with.
  echo "== $("$VENV/bin/python" -c 'import sys; print("Python", sys.version.split()[0])'), $("$VENV/bin/python" -m pip --version | cut -d' ' -f1-2), setuptools $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("setuptools"))')"
  export PATH="$PWD/$VENV/bin:$PATH"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
}

run_tests() {
  setup
  echo "== ruff"
  ruff check .
  ruff format --check .
  echo "== pytest"
  python -m pytest -q tests "$@"
}

# The demo's runs: run folder, model (`mner models`), epochs, then any extra train-from-cache options.
# text_only is bert-crf, which never opens the cache; every other run reads the one demo cache. All share
# configs/experiments/demo.toml. Epochs are cut to keep the demo within 5 minutes on 2 CPU cores, most for
# the slower mango and ifaformer (ifaformer with batch 16 instead of its 32, so that 3 epochs are 45 steps;
# mango with its gated update opened, which at the original's inits carries no image on a set this small,
# README models table, one optimiser step per batch, and the dropout of the original's training script,
# script/train.sh's --drop_prob 0.1, not its config.py's 0.3, which needs 10 epochs here);
# each run prints its epochs. afner is not run: at their originals' defaults AFNER and AFDVQF are the
# same model (README models table), and the demo gave both the same row.
DEMO_RUNS=(
  "text_only bert-crf 5"
  "afdvqf afdvqf 5"
  "mango mango 4 --set model.gate_alpha_init=1.0 --set model.gate_bias_init=0.0 --set train.grad_accum=1 --set model.dropout=0.1"
  "ifaformer ifaformer 3 --set train.batch_size=16"
)

run_demo() {
  setup
  local out="${MNER_DEMO_OUT:-demo_out}"
  local start=$SECONDS
  local names=() name model epochs extra source
  echo "== 1/5 demo data (seeded; an entity's type is visible only in its image)"
  mner demo-data --out "$out/data"
  echo "== 2/5 stage one: extract-features with UNTRAINED random demo-clip + tiny-frcnn"
  if [ -f "$out/cache/manifest.json" ]; then echo "   a cache exists at $out/cache: completed shards are reused"; fi
  # demo-clip has MiniLM's 6 layers of 384, so IFAformer's vision tower pairs with the text encoder; the
  # cache stores its embedding output (--vision-trainable-blocks 6: all), which IFAformer's tower runs from
  # and from which MANGO trains CLIP's last 2 blocks.
  mner extract-features --data-dir "$out/data" --clip demo-clip --detector tiny-frcnn \
    --vision-trainable-blocks 6 --out "$out/cache"
  mner cache verify "$out/cache" --data-dir "$out/data"
  echo "== 3/5 stage two: one run per model, all from the one cache (text-only never opens it)"
  rm -rf "$out/runs/multimodal"  # the folder of the demo's earlier two-run form
  for row in "${DEMO_RUNS[@]}"; do
    read -r name model epochs extra <<<"$row"
    if [ "$model" = bert-crf ]; then source=(--text-only); else source=(--cache "$out/cache"); fi
    echo "   $name: model $model, $epochs epochs${extra:+ ($extra)} ($((SECONDS - start)) s so far)"
    rm -rf "${out:?}/runs/$name"
    # shellcheck disable=SC2086 # $extra holds whole options
    mner train-from-cache "${source[@]}" --model "$model" --data-dir "$out/data" \
      --config configs/experiments/demo.toml --epochs "$epochs" $extra --out "$out/runs/$name"
    names+=("$out/runs/$name")
  done
  echo "== 4/5 results (each run against text_only: paired bootstrap dF1, CI95, p)"
  mner results "${names[@]}" --split test
  echo "== 5/5 case study: the test posts where the afdvqf run's predictions differ from text-only's"
  mner cases "$out/runs/text_only" "$out/runs/afdvqf" --split test --out "$out/cases"
  echo "== demo done in $((SECONDS - start)) s; outputs under $out/"
}

# The classify demo's runs: run folder, mode, head. text never opens the cache. All share
# configs/classify/demo.toml; the cnn head (convolutions over the joined vector) gets a head learning
# rate of 1e-3, which it needs (it does not learn at the demo's 1e-2).
CLASSIFY_RUNS=(
  "text text mlp"
  "image image mlp"
  "both_mlp both mlp"
  "both_attention both attention"
  "both_xattn both xattn"
  "both_cnn both cnn --set classifier.lr_head=1e-3"
)

run_classify() {
  setup
  local out="${MNER_DEMO_OUT:-demo_out}/classify"
  local start=$SECONDS
  local names=() name mode head extra
  echo "== 1/4 demo data (seeded MVSA style; the label is in every image and in 40% of the texts)"
  mner demo-data --classification --out "$out/data"
  echo "== 2/4 stage one: extract-features with the UNTRAINED random tiny-resnet, no detector, layer3's map"
  echo "   stored so that the classifier's layer4 trains (its default, classifier.vision_trainable_blocks = 1)"
  mner extract-features --data-dir "$out/data" --vision tiny-resnet --detector none --vision-trainable-blocks 1 \
    --out "$out/cache"
  mner cache verify "$out/cache"
  echo "== 3/4 stage two: train-classifier per mode and head, all from the one cache"
  for row in "${CLASSIFY_RUNS[@]}"; do
    read -r name mode head extra <<<"$row"
    echo "   $name: mode $mode, head $head${extra:+ ($extra)} ($((SECONDS - start)) s so far)"
    rm -rf "${out:?}/runs/$name"
    # shellcheck disable=SC2086 # $extra holds whole options
    mner train-classifier --data-dir "$out/data" --cache "$out/cache" --mode "$mode" --head "$head" \
      --config configs/classify/demo.toml $extra --out "$out/runs/$name"
    names+=("$out/runs/$name")
  done
  echo "== 4/4 results on the demo test split (accuracy; macro P/R/F1)"
  mner results "${names[@]}" --split test
  echo "== classify demo done in $((SECONDS - start)) s; outputs under $out/ (the submission file of each run:"
  echo "   runs/<name>/pred_test_without_label.txt)"
}

run_dataset() {
  local dataset="$1"
  shift
  local out="runs/$dataset" text_encoder="minilm" epochs="" extract_args=() train_args=() data_args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --data-root) data_args+=(--dataset "$dataset" --data-root "$2"); shift 2 ;;
      --image-dir) data_args+=(--image-dir "$2"); shift 2 ;;
      --clip | --detector | --detector-ckpt | --batch-size | --num-workers | --device | --topk | --score-thr)
        extract_args+=("$1" "$2"); shift 2 ;;
      --text-encoder) text_encoder="$2"; shift 2 ;;
      --epochs) train_args+=(--epochs "$2"); shift 2 ;;
      --out) out="$2"; shift 2 ;;
      *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
    esac
  done
  if [ ${#data_args[@]} -eq 0 ]; then echo "--data-root DIR is required for $dataset" >&2; exit 2; fi
  setup
  mner extract-features "${data_args[@]}" "${extract_args[@]}" --out "$out/cache"
  mner cache verify "$out/cache" "${data_args[@]}"
  mner train-from-cache --cache "$out/cache" "${data_args[@]}" --text-encoder "$text_encoder" \
    "${train_args[@]}" --out "$out/run"
  mner evaluate "$out/run" --split test
}

case "${1:-demo}" in
  demo) run_demo ;;
  classify) run_classify ;;
  test) shift; run_tests "$@" ;;
  -h | --help) sed -n '2,16p' "$0" ;;
  *) run_dataset "$@" ;;
esac
