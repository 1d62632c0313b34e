#!/usr/bin/env bash
# Scale model: what `make pipeline`'s stages (data/pipeline.toml) would cost on
# the real ISIC 2020 training set (33,126 full-size JPEGs), on 2, 16 and 64
# cores, from short runs on this machine. A report (stdout and
# benches/out/scale.md), never asserts: every 16- and 64-core number, and every
# 33,126-image number, is a model's output, not a measurement.
#
# Method. Every real-data stage of the pipeline (synth only makes the bundled
# data, so it is not a row) has a cost unit, the work it does that grows with
# the data; the unit is counted from the stage's own outputs in each run, and
# computed for ISIC 2020:
#   ingest            source images (rows)
#   preprocess        images decoded
#   train_cyclegan    training steps (train.json): (n_epochs + n_epochs_decay)
#                     x ceil(malignant training images / batch_size)
#   generate          synthetic images written (generate.json)
#   fidelity          images through the feature network (fidelity.json: the
#                     reference set and every row, each capped at max_images)
#   train_classifier  training image-epochs over all seeds (train.json's
#                     epoch_composition x epochs x seeds); scoring the
#                     validation and test images rides along (step 1 keeps
#                     the real run's split, so it scales the same way)
#   evaluate          test predictions (test images x the arms' seeds)
# 1. Two dataset sizes: a scratch copy of the pipeline (its own store and
#    outputs under benches/out/tmp/scale) runs from an empty store at N1 and
#    N2 synthetic images on 2 threads. Each stage's wall time is the time
#    between its line in `melanoflow run` and the line before it (stamped as
#    they arrive, so it includes the stage's fingerprinting and commit; stages
#    run one at a time, -j 1). Per stage, time = a + b x units, fitted through
#    the two points, and evaluated at ISIC 2020's units. The scratch copy
#    differs from the modelled pipeline only in size: synth's count (and
#    patients, in proportion), ingest's split fractions taken from
#    data/isic2020.toml (so the share of validation and test images scored per
#    training image matches the real run), CycleGAN epochs cut to
#    SCALE_GAN_EPOCHS and classifier seeds to SCALE_SEEDS (both are counted in
#    the units, and the model multiplies them back), and device = "cpu".
# 2. Full-size images: decoding is what full-size JPEGs change, so ingest and
#    preprocess are also measured on two sets of photos of different file
#    size: the SCALE_PHOTO_N smallest and largest real ISIC archive photos in
#    ../shared/realdata/isic_archive_uda1 (722x540 to 3072x2304), or, where
#    that folder is absent (it is, outside this project's workplace), two sets
#    of synthetic JPEGs drawn at SCALE_SYN_SIZES px (smoother than photos: the
#    report says which). Per image, cost = alpha + beta x MB of JPEG, through
#    the two sets (median of SCALE_PHOTO_REPS runs each, minus the stage's
#    fixed cost a from step 1), evaluated at ISIC 2020's mean file size
#    (SCALE_MB: 23 GB of JPEGs / 33,126 images), which lies beyond the largest
#    set measured here.
# 3. Cores: the same pipeline at SCALE_THREADS_N images again on 1 thread
#    (RAYON_NUM_THREADS, which sizes the pool every parallel step uses; the
#    photo sets too). Speedup S = T1/T2 per stage gives Amdahl's parallel
#    fraction p = 2 (1 - 1/S), clamped to [0, 1]; then
#    T(n) = T1 ((1 - p) + p / n_eff), n_eff = n, except for the model stages
#    (CycleGAN, generate, fidelity, classifier), where n_eff = min(n,
#    SCALE_KERNEL_CAP): the CPU kernels cut each convolution into 8 work units
#    (stages/models/kernels/conv/tiling.rs, UNITS) and beyond that only gemm's
#    own threads split a product, at an efficiency nobody measured here. The
#    total row is the sum of the stages run one after another (-j 1);
#    `[executor] jobs` would overlap the independent ones.
#
# Knobs (environment): MELANOFLOW (binary, default target/release/melanoflow),
# SCALE_CONFIG (the pipeline modelled, data/pipeline.toml), SCALE_TARGET (the
# real run's ingest split, data/isic2020.toml), SCALE_N1 (1000) and SCALE_N2
# (2 x N1) images, SCALE_THREADS_N (N2: where 1 thread is measured; 0 skips the
# 1-thread runs and the core columns), SCALE_GAN_EPOCHS (2), SCALE_SEEDS (1),
# SCALE_SET (space-separated STAGE.KEY=VALUE overrides, applied to the
# measured runs and to the model alike: e.g. "preprocess.size=224" measures
# and models 224 px; the training stages then cost about (224/64)^2 times as
# much per unit, so lower SCALE_N1 with it), SCALE_PHOTOS (a folder with labels.csv and images/;
# default ../shared/realdata/isic_archive_uda1), SCALE_PHOTO_N (50 per set),
# SCALE_PHOTO_REPS (3), SCALE_SYN_SIZES ("512 1024"), SCALE_IMAGES (33126),
# SCALE_DUPLICATES (425 pairs), SCALE_MALIGNANT (584), SCALE_MB (0.694),
# SCALE_CORES ("2 16 64"), SCALE_KERNEL_CAP (8; 0 = no cap), SCALE_TIMEOUT
# (3600 s per run), SCALE_RUNS (1: repetitions of every pipeline run, interleaved;
# each stage keeps its fastest, since other work only adds time),
# BENCH_KEEP_TMP=1 (keep the scratch folders).
# The defaults are sized for about 10 minutes on 2 idle cores (an estimate from
# README's per-stage table: N1 ~1.5 min, N2 ~2.5 min, N2 on 1 thread ~4.5 min,
# the photo sets under a minute). A smoke test of the script (2-3 minutes):
#   SCALE_N1=240 SCALE_GAN_EPOCHS=1 SCALE_PHOTO_N=10 SCALE_PHOTO_REPS=1 \
#   SCALE_SET="preprocess.size=32 synth.image_size=64 synth.malignant_fraction=0.15" \
#   benches/scale.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
. benches/lib.sh
BIN=${MELANOFLOW:-target/release/melanoflow}
case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac
OUTDIR="$ROOT/benches/out"
REPORT="$OUTDIR/scale.md"
LOG="$OUTDIR/scale.log"
W="$OUTDIR/tmp/scale"

export SCALE_CONFIG=${SCALE_CONFIG:-data/pipeline.toml}
export SCALE_TARGET=${SCALE_TARGET:-data/isic2020.toml}
N1=${SCALE_N1:-1000}
N2=${SCALE_N2:-$((2 * N1))}
NT=${SCALE_THREADS_N:-$N2}
export SCALE_GAN_EPOCHS=${SCALE_GAN_EPOCHS:-2}
export SCALE_SEEDS=${SCALE_SEEDS:-1}
export SCALE_SET=${SCALE_SET:-}
PHOTOS=${SCALE_PHOTOS:-$ROOT/../shared/realdata/isic_archive_uda1}
PHOTO_N=${SCALE_PHOTO_N:-50}
REPS=${SCALE_PHOTO_REPS:-3}
export SCALE_PHOTO_REPS=$REPS
export SCALE_SYN_SIZES=${SCALE_SYN_SIZES:-"512 1024"}
export SCALE_IMAGES=${SCALE_IMAGES:-33126}
export SCALE_DUPLICATES=${SCALE_DUPLICATES:-425}
export SCALE_MALIGNANT=${SCALE_MALIGNANT:-584}
export SCALE_MB=${SCALE_MB:-0.694}
export SCALE_CORES=${SCALE_CORES:-"2 16 64"}
export SCALE_KERNEL_CAP=${SCALE_KERNEL_CAP:-8}
TIMEOUT=${SCALE_TIMEOUT:-3600}
RUNS=${SCALE_RUNS:-1}

die() { say "scale: $*"; exit 1; }
[ -x "$BIN" ] || die "no melanoflow binary at $BIN (run \`make build\`, or set MELANOFLOW)"
command -v python3 >/dev/null || die "python3 (3.11+, for tomllib) is needed: run timing, fits, report"
python3 -c 'import tomllib' 2>/dev/null || die "python3 3.11+ is needed (tomllib)"
[ -f "$SCALE_CONFIG" ] || die "no pipeline file $SCALE_CONFIG"
[ "$N2" -gt "$N1" ] || die "SCALE_N2 ($N2) must be larger than SCALE_N1 ($N1)"

mkdir -p "$OUTDIR"
rm -rf "$W"
mkdir -p "$W/runs"
: >"$LOG"
export SCALE_LOG=$LOG SCALE_W=$W
cleanup() {
    if [ "${BENCH_KEEP_TMP:-0}" != 1 ]; then
        rm -rf "$W"
        rmdir "$OUTDIR/tmp" 2>/dev/null || true
    fi
    say "scale: ${SECONDS} s in all"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------
# The helper: scratch pipelines, stamped runs, unit counts, fits, the report.
PY="$W/scale.py"
cat >"$PY" <<'PYEOF'
import json, math, os, re, resource, shutil, statistics, subprocess, sys, time, tomllib
from pathlib import Path

E = os.environ
W = Path(E["SCALE_W"])
LOG = E["SCALE_LOG"]
BIN = E["SCALE_BIN"]
ROOT = Path.cwd()
CONFIG = (ROOT / E["SCALE_CONFIG"]).resolve()
# Stages that run the networks on the CPU kernels (capped: see the header).
MODEL_KINDS = {"train_cyclegan", "generate", "fidelity", "train_classifier"}
# train_cyclegan's presets (stages/train_cyclegan/mod.rs, README's parameter
# table): (batch_size, n_epochs = n_epochs_decay).
PRESETS = {"default": (4, 12), "paper": (8, 360)}


def log(*lines):
    with open(LOG, "a") as f:
        for line in lines:
            f.write(line.rstrip("\n") + "\n")


def toml_value(text):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def config():
    """The modelled pipeline: the config file with SCALE_SET applied."""
    cfg = tomllib.loads(CONFIG.read_text())
    stages = cfg.get("stages", {})
    for name, st in stages.items():
        if "foreach" in st:
            sys.exit(f"scale: stage `{name}` uses foreach, which this model does not handle")
    for item in E.get("SCALE_SET", "").split():
        key, eq, value = item.partition("=")
        stage, dot, param = key.partition(".")
        if not eq or not dot or stage not in stages:
            sys.exit(f"scale: SCALE_SET item `{item}` is not STAGE.KEY=VALUE for a stage of {CONFIG.name}")
        stages[stage][param] = toml_value(value)
    return cfg


def target_split():
    t = tomllib.loads((ROOT / E["SCALE_TARGET"]).read_text())
    ing = next((s for s in t.get("stages", {}).values() if s.get("kind") == "ingest"), {})
    return float(ing.get("val_fraction", 0.15)), float(ing.get("test_fraction", 0.15))


def toml_dump(d):
    """A small TOML writer for what pipeline files hold."""
    bare = lambda k: k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float, str)):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{bare(k)} = {val(x)}" for k, x in v.items()) + " }"
        raise TypeError(v)
    out = []
    def table(path, t):
        scalars = {k: v for k, v in t.items() if not isinstance(v, dict)}
        if path:
            out.append(f"[{path}]")
            out.extend(f"{bare(k)} = {val(v)}" for k, v in scalars.items())
            out.append("")
        for k, v in t.items():
            if isinstance(v, dict):
                table(f"{path}.{bare(k)}" if path else bare(k), v)
    table("", d)
    return "\n".join(out)


def absolute_paths(st):
    """Relative paths among a stage's parameters (weights, metadata, ...) made
    absolute, so the scratch copy reads the same files."""
    for k, v in list(st.items()):
        if isinstance(v, str) and "/" in v and "://" not in v and not v.startswith("/"):
            p = CONFIG.parent / v
            if p.exists():
                st[k] = str(p.resolve())


def scratch(stages):
    return {"store": {"url": "store"}, "outputs": {"dir": "out"}, "stages": stages}


def project(d, n):
    """The pipeline at n synthetic images, as measured (header, step 1)."""
    cfg = config()
    val, test = target_split()
    gan_epochs, seeds = int(E["SCALE_GAN_EPOCHS"]), int(E["SCALE_SEEDS"])
    stages = {}
    for name, st in cfg["stages"].items():
        st = dict(st)
        st.pop("resources", None)
        absolute_paths(st)
        kind = st.get("kind")
        if kind == "synth":
            count, patients = st.get("count", 4000), st.get("patients", 250)
            st["count"], st["patients"] = n, max(1, round(n * patients / count))
        elif kind == "ingest":
            st["val_fraction"], st["test_fraction"] = val, test
        elif kind == "train_cyclegan":
            st["n_epochs"], st["n_epochs_decay"] = 1, max(gan_epochs - 1, 0)
        elif kind == "train_classifier":
            st["seeds"] = list(st.get("seeds", [0]))[:seeds]
        if kind in MODEL_KINDS:
            st["device"] = "cpu"
        stages[name] = st
    d.mkdir(parents=True, exist_ok=True)
    (d / "pipeline.toml").write_text(toml_dump(scratch(stages)))


LINE = re.compile(r"^(ran|cached|restored|FAILED|skipped)\s+(\S+?)(?::\s|\s|$)(.*)$")


def stamp(out, cmd, threads):
    """Runs cmd on `threads` threads; each stage's time is the gap between its
    stdout line and the line before it (stamped as they arrive)."""
    env = dict(E, RAYON_NUM_THREADS=str(threads))
    log(f"## RAYON_NUM_THREADS={threads} {' '.join(map(str, cmd))}")
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(LOG, "a") as errf:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, text=True, env=env)
        last, stages = t0, {}
        for line in p.stdout:
            now = time.perf_counter()
            line = line.rstrip("\n")
            log(f"[{now - t0:8.3f}] {line}")
            m = LINE.match(line)
            if m:
                state, name, rest = m.groups()
                summary = rest.split(" -> ", 1)[1] if " -> " in rest else ""
                stages[name] = {"state": state, "seconds": now - last, "summary": summary}
                last = now
        try:
            rc = p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    r = {"rc": rc, "wall": time.perf_counter() - t0, "cpu": cpu, "threads": threads, "stages": stages}
    out.write_text(json.dumps(r, indent=1))
    bad = [n for n, s in stages.items() if s["state"] != "ran"]
    if rc != 0 or bad:
        sys.exit(f"scale: `{' '.join(map(str, cmd))}` exited {rc}; stages not run: {bad} (see {LOG})")
    return r


def cmd_pipeline(args):
    """pipeline TAG N THREADS: one measured run of the scratch pipeline."""
    tag, n, threads = args[0], int(args[1]), int(args[2])
    d = W / "runs" / tag
    project(d, n)
    r = stamp(d / "stamp.json", [BIN, "run", "--config", d / "pipeline.toml", "-j", "1"], threads)
    st = tomllib.loads((d / "pipeline.toml").read_text())["stages"]
    r["units"] = {name: measured_units(d, name, s.get("kind"), r, st) for name, s in st.items()}
    jpegs = [p.stat().st_size for name, s in st.items() if s.get("kind") == "synth"
             for p in (d / "out" / name / "train").glob("*.jpg")]
    r["syn_mb"] = statistics.fmean(jpegs) / 1e6 if jpegs else 0.0
    (d / "stamp.json").write_text(json.dumps(r, indent=1))
    if E.get("BENCH_KEEP_TMP", "0") != "1":
        for sub in ("store", "out"):
            shutil.rmtree(d / sub, ignore_errors=True)
    print(f"  {tag}: {n:,} images on {threads} thread(s): {r['wall']:.1f} s", file=sys.stderr)


# --- photo sets (header, step 2) --------------------------------------------------

def photo_project(d, csv, images):
    """ingest + preprocess of those images with the modelled pipeline's
    preprocess parameters, after a 4-image synth that absorbs the process's
    start-up (independent stages run in file order)."""
    cfg = config()
    val, test = target_split()
    pre = next((dict(s) for s in cfg["stages"].values() if s.get("kind") == "preprocess"),
               {"kind": "preprocess"})
    pre.pop("resources", None)
    pre["inputs"] = ["ingest"]
    ingest = {"kind": "ingest", "metadata": str(csv), "images": str(images),
              "val_fraction": val, "test_fraction": test}
    if "patient_id" not in csv.read_text().splitlines()[0].split(","):
        ingest["patient_per_image"] = True
    d.mkdir(parents=True, exist_ok=True)
    (d / "pipeline.toml").write_text(toml_dump(scratch(
        {"warmup": {"kind": "synth", "count": 4, "image_size": 32, "patients": 2},
         "ingest": ingest, "preprocess": pre})))


def real_sets(src, n):
    """The n smallest and n largest JPEGs named in src/labels.csv."""
    lines = (src / "labels.csv").read_text().splitlines()
    header, rows = lines[0], [l for l in lines[1:] if l.strip()]
    files = {}
    for r in rows:
        name = r.split(",")[0]
        for ext in ("jpg", "jpeg", "JPG", "png"):
            p = src / "images" / f"{name}.{ext}"
            if p.exists():
                files[name] = (p, r)
                break
    if len(files) < 4:
        sys.exit(f"scale: {src} has only {len(files)} images named in labels.csv")
    n = min(n, len(files) // 2)
    order = sorted(files, key=lambda k: files[k][0].stat().st_size)
    sets = []
    for tag, names in (("smallest", order[:n]), ("largest", order[-n:])):
        d = W / "photos" / tag
        (d / "images").mkdir(parents=True)
        with open(d / "labels.csv", "w") as f:
            f.write(header + "\n")
            for k in names:
                p, r = files[k]
                (d / "images" / p.name).symlink_to(p.resolve())
                f.write(r + "\n")
        sets.append((tag, d / "labels.csv", d / "images"))
    return sets


def synthetic_sets(sizes, n):
    """n synthetic JPEGs at each size, drawn once by the pipeline's synth."""
    cfg = config()
    base = next((dict(s) for s in cfg["stages"].values() if s.get("kind") == "synth"), {"kind": "synth"})
    base.pop("resources", None)
    sets = []
    for size in sizes:
        d = W / "photos" / f"synth{size}"
        st = dict(base, count=n, image_size=size, patients=max(2, n // 10))
        d.mkdir(parents=True)
        (d / "pipeline.toml").write_text(toml_dump(scratch({"synth": st})))
        stamp(d / "stamp.json", [BIN, "run", "--config", d / "pipeline.toml"], 2)
        sets.append((f"{size} px", d / "out" / "synth" / "train.csv", d / "out" / "synth" / "train"))
    return sets


def cmd_photos(args):
    """photos SRC N REPS THREADS...: ingest + preprocess times of two photo sets."""
    src, n, reps = Path(args[0]), int(args[1]), int(args[2])
    threads = [int(t) for t in args[3:]]
    if (src / "labels.csv").is_file() and (src / "images").is_dir():
        sets = real_sets(src, n)
        n = len(list(sets[0][2].iterdir()))
        what = f"real ISIC archive photos (the {n} smallest and {n} largest files of {src.name})"
    else:
        sizes = [int(s) for s in E["SCALE_SYN_SIZES"].split()][:2]
        sets = synthetic_sets(sizes, n)
        what = (f"{n} synthetic JPEGs at {' and '.join(map(str, sizes))} px ({src} is absent: "
                f"synthetic lesions are smoother than photos, so fewer bytes per pixel)")
    result = {"what": what, "sets": []}
    for tag, csv, images in sets:
        for p in images.iterdir():  # into the page cache: the model leaves out disk reads
            p.read_bytes()
        sizes = [p.stat().st_size for p in images.iterdir()
                 if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
        result["sets"].append({"tag": tag, "n": len(sizes), "mb": statistics.fmean(sizes) / 1e6,
                               "times": {str(t): {"ingest": [], "preprocess": []} for t in threads}})
    for rep in range(reps):
        for (tag, csv, images), rs in zip(sets, result["sets"]):
            for t in threads:
                d = W / "photo_runs" / f"{tag.replace(' ', '')}_t{t}_r{rep}"
                photo_project(d, csv, images)
                r = stamp(d / "stamp.json", [BIN, "run", "--config", d / "pipeline.toml", "-j", "1"], t)
                for k in ("ingest", "preprocess"):
                    rs["times"][str(t)][k].append(r["stages"][k]["seconds"])
    (W / "photos.json").write_text(json.dumps(result, indent=1))
    for rs in result["sets"]:
        print(f"  photos {rs['tag']}: {rs['n']} images, {rs['mb']:.3f} MB each: "
              + ", ".join(f"{t} thread(s) preprocess {statistics.median(v['preprocess']):.3f} s"
                          for t, v in rs["times"].items()), file=sys.stderr)


# --- units ----------------------------------------------------------------------

def measured_units(proj, name, kind, run, st):
    """The stage's units in one measured run, from its line and its outputs."""
    out = proj / "out" / name
    summary = run["stages"][name]["summary"]
    def rx(pat):
        m = re.search(pat, summary)
        if not m:
            sys.exit(f"scale: cannot read `{pat}` from {name}'s line: {summary}")
        return int(m.group(1))
    js = lambda f: json.loads((out / f).read_text())
    if kind == "ingest":
        return rx(r"(\d+) rows")
    if kind == "preprocess":
        return rx(r"decoded (\d+)")
    if kind == "train_cyclegan":
        return js("train.json")["steps"]
    if kind == "generate":
        return js("generate.json")["synthetic"]
    if kind == "fidelity":
        f = js("fidelity.json")
        return f["reference_images"] + sum(r["images"] for r in f["rows"])
    if kind == "train_classifier":
        t, c = js("train.json"), js("config.json")["params"]
        return sum(t["epoch_composition"].values()) * c["epochs"] * len(c["seeds"])
    if kind == "evaluate":
        seeds = sum(len(json.loads((proj / "out" / i / "config.json").read_text())["params"]["seeds"])
                    for i in st[name].get("inputs", [])
                    if st.get(i, {}).get("kind") == "train_classifier")
        return rx(r"on (\d+) test images") * max(seeds, 1)
    return None


def target(cfg):
    """ISIC 2020's units for every stage of the modelled pipeline."""
    R, D, M = (int(E[k]) for k in ("SCALE_IMAGES", "SCALE_DUPLICATES", "SCALE_MALIGNANT"))
    vf, tf = target_split()
    I, tr = R - D, 1 - vf - tf
    mal, ben = round(M * tr), round((I - M) * tr)
    split = dict(images=I, mal=mal, ben=ben, val=round(I * vf), test=round(I * tf), vf=vf, tf=tf)
    st = cfg["stages"]
    synth = {}
    for name, s in st.items():
        if s.get("kind") == "generate":
            wanted = round(float(s.get("target_ratio", 1.0)) * ben)
            synth[name] = min(max(wanted - mal, 0), ben)
    units = {}
    for name, s in st.items():
        k = s.get("kind")
        if k == "ingest":
            units[name] = (R, f"{R:,} rows")
        elif k == "preprocess":
            units[name] = (I, f"{I:,} images")
        elif k == "train_cyclegan":
            batch, ep = PRESETS[s.get("preset", "default")]
            batch = s.get("batch_size", batch)
            e = s.get("n_epochs", ep) + s.get("n_epochs_decay", ep)
            spe = math.ceil(mal / batch)
            units[name] = (e * spe, f"{e * spe:,} steps ({e} epochs x {spe})")
        elif k == "generate":
            units[name] = (synth[name], f"{synth[name]:,} images")
        elif k == "fidelity":
            cap = int(s.get("max_images", 1000))
            gens = [i for i in s.get("inputs", []) if i in synth]
            u = min(cap, mal) + sum(min(cap, synth[g]) for g in gens) + min(cap, ben)
            units[name] = (u, f"{u:,} images")
        elif k == "train_classifier":
            aug, ratio = s.get("augmentation"), float(s.get("target_ratio", 1.0))
            epoch = ben + mal
            if aug == "classical":
                epoch += max(round(ratio * ben) - mal, 0)
            elif aug == "cyclegan":
                epoch += sum(synth.get(i, 0) for i in s.get("inputs", []))
            e, seeds = int(s.get("epochs", 10)), len(s.get("seeds", [0]))
            units[name] = (epoch * e * seeds, f"{epoch * e * seeds:,} ({epoch:,} x {e} epoch(s) x {seeds} seed(s))")
        elif k == "evaluate":
            seeds = sum(len(st[i].get("seeds", [0])) for i in s.get("inputs", [])
                        if st.get(i, {}).get("kind") == "train_classifier")
            u = split["test"] * max(seeds, 1)
            units[name] = (u, f"{u:,} ({split['test']:,} x {max(seeds, 1)} arm-seeds)")
    return units, split


# --- report (header, step 3) ----------------------------------------------------------

def dur(s):
    if s is None:
        return "n/a"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 72 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def per_unit(s):
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def fit(u1, t1, u2, t2):
    """a + b u through the two sizes: (a, b, why it is not a plain fit)."""
    if u2 != u1:
        b = (t2 - t1) / (u2 - u1)
        a = t1 - b * u1
        if b > 0:
            return (0.0, b, "intercept below 0, set to 0") if a < 0 else (a, b, "")
    return 0.0, (t2 / u2 if u2 else 0.0), "no positive slope between the sizes: proportional to the larger"


def amdahl(t2, p, n, cap):
    n_eff = min(n, cap) if cap else n
    return t2 / ((1 - p) + p / 2) * ((1 - p) + p / n_eff)


def photo_per_image(photos, a, kind, threads, mb):
    """Per-image cost at mb MB through the two photo sets (each minus the
    stage's fixed cost a): (cost, the two measured points, whether the line
    fell with MB, so the larger set's cost is used flat)."""
    pts = []
    for ps in photos["sets"]:
        ts = ps["times"].get(str(threads), {}).get(kind)
        if ts:
            pts.append((ps["mb"], max(statistics.median(ts) - a, 0.0) / ps["n"]))
    if len(pts) != 2:
        return None, pts, False
    (m0, c0), (m1, c1) = sorted(pts)
    beta = (c1 - c0) / (m1 - m0) if m1 > m0 else 0.0
    if beta < 0:
        return max(c0, c1), sorted(pts), True
    return c1 + beta * (mb - m1), sorted(pts), False


def cmd_report(args):
    n1, n2, nt = (int(x) for x in args[:3])
    cfg = config()
    st = cfg["stages"]
    cores = [int(c) for c in E["SCALE_CORES"].split()]
    cap = int(E["SCALE_KERNEL_CAP"])
    mb = float(E["SCALE_MB"])
    tgt, split = target(cfg)
    runs = {}
    for tag in ("n1_t2", "n2_t2", "nt_t1", "nt_t2"):
        reps = [json.loads(f.read_text()) for f in sorted((W / "runs").glob(f"{tag}.r*/stamp.json"))]
        if not reps:
            continue
        # Each stage's fastest repetition: other work on the machine only adds time.
        merged = dict(reps[0], reps=len(reps), cpu_per_wall=[r["cpu"] / r["wall"] for r in reps])
        merged["stages"] = {k: dict(v, seconds=min(r["stages"][k]["seconds"] for r in reps))
                            for k, v in reps[0]["stages"].items()}
        runs[tag] = (None, merged)
    if "nt_t1" in runs and "nt_t2" not in runs:
        runs["nt_t2"] = runs["n1_t2" if nt == n1 else "n2_t2"]
    photos = json.loads((W / "photos.json").read_text())
    fit_notes, rows, slower = [], [], []
    for name, s in st.items():
        kind = s.get("kind")
        if kind == "synth":
            continue
        (_, r1), (_, r2) = runs["n1_t2"], runs["n2_t2"]
        t1, t2 = r1["stages"][name]["seconds"], r2["stages"][name]["seconds"]
        row = {"stage": name, "kind": kind, "t1": t1, "t2": t2}
        rows.append(row)
        u1, u2 = r1["units"].get(name), r2["units"].get(name)
        if name not in tgt or u1 is None:
            row["skip"] = f"no cost unit for kind `{kind}`"
            continue
        ut, how = tgt[name]
        a, b, why = fit(u1, t1, u2, t2)
        speedup = None
        if "nt_t1" in runs:
            tt1, tt2 = runs["nt_t1"][1]["stages"][name]["seconds"], runs["nt_t2"][1]["stages"][name]["seconds"]
            speedup = tt1 / tt2 if tt2 > 0 else None
        unit = {"ingest": "per image", "preprocess": "per image", "train_cyclegan": "per step",
                "generate": "per image", "fidelity": "per image featurised",
                "train_classifier": "per training image-epoch",
                "evaluate": "per test prediction"}[kind]
        if kind in ("ingest", "preprocess"):
            c2, pts, flat = photo_per_image(photos, a, kind, 2, mb)
            c1, _, _ = photo_per_image(photos, a, kind, 1, mb)
            if flat:
                fit_notes.append(f"`{name}`: the larger photo files cost less per image than the smaller "
                                 f"({', '.join(f'{per_unit(c)} at {m:.3f} MB' for m, c in pts)}), below "
                                 "what these runs resolve: the larger of the two is used, flat in MB.")
            if c2 is not None and c2 > 0:
                b, why = c2, ""
                if c1 is not None:
                    speedup = c1 / c2
                unit = (f"{per_unit(b)} per image at {mb:.2f} MB (measured: "
                        + ", ".join(f"{per_unit(c)} at {m:.3f} MB" for m, c in pts) + ")")
            else:
                unit = (f"{per_unit(b)} per image (the N1 -> N2 slope, {r2.get('syn_mb', 0):.3f} MB JPEGs: "
                        f"the photo sets took no longer than the stage's fixed cost)")
        else:
            unit = f"{per_unit(b)} {unit}"
            if a > 0.02 * (a + b * ut):
                unit += f" + {dur(a)} fixed"
        if why:
            fit_notes.append(f"`{name}`: {why} ({u1:,} -> {u2:,} units took {t1:.2f} -> {t2:.2f} s).")
        t2r = a + b * ut
        row.update(unit=unit, target=how, speedup=speedup)
        if speedup is None:
            row["p"], row["at"] = None, {n: (t2r if n == 2 else None) for n in cores}
        else:
            p = min(max(2 * (1 - 1 / speedup), 0.0), 1.0)
            if speedup < 1:
                slower.append(f"`{name}` {speedup:.2f}x")
            c = cap if kind in MODEL_KINDS else 0
            row["p"] = p
            row["at"] = {n: amdahl(t2r, p, n, c) for n in cores}
            row["at_uncapped"] = {n: amdahl(t2r, p, n, 0) for n in cores}

    ok = [r for r in rows if "skip" not in r]
    capped = bool(cap) and "nt_t1" in runs and any(n > cap for n in cores) \
        and any(r["kind"] in MODEL_KINDS for r in ok)
    out = [f"| stage | N1 = {n1:,}, measured | N2 = {n2:,}, measured | cost unit (2 threads, fitted) | "
           + (f"units at ISIC 2020 | 1 -> 2 threads at {nt:,}, measured; p | " if "nt_t1" in runs
              else "units at ISIC 2020 | 1 -> 2 threads: not measured (SCALE_THREADS_N=0) | ")
           + " | ".join(f"{n} cores, model" for n in cores) + " |",
           "|" + "---|" * (6 + len(cores))]
    for r in rows:
        if "skip" in r:
            out.append(f"| `{r['stage']}` ({r['kind']}) | {dur(r['t1'])} | {dur(r['t2'])} | {r['skip']} |"
                       + " |" * (2 + len(cores)))
            continue
        sp = f"{r['speedup']:.2f}x; {r['p']:.2f}" if r["speedup"] is not None else "not measured"
        out.append(f"| `{r['stage']}` ({r['kind']}) | {dur(r['t1'])} | {dur(r['t2'])} | {r['unit']} | "
                   f"{r['target']} | {sp} | " + " | ".join(dur(r["at"][n]) for n in cores) + " |")
    total_at = {n: (sum(r["at"][n] for r in ok) if all(r["at"][n] is not None for r in ok) else None)
                for n in cores}
    out.append(f"| **total**, one stage at a time | {dur(sum(r['t1'] for r in ok))} | "
               f"{dur(sum(r['t2'] for r in ok))} | | | | "
               + " | ".join(f"**{dur(total_at[n])}**" for n in cores) + " |")
    if capped:
        un = {n: sum(r["at_uncapped"][n] for r in ok) for n in cores}
        out.append(f"| total, model stages not capped at {cap} threads | | | | | | "
                   + " | ".join(dur(un[n]) for n in cores) + " |")

    sets = E.get("SCALE_SET", "")
    text = [
        f"## Scale model: `{E['SCALE_CONFIG']}`'s stages on ISIC 2020 ({int(E['SCALE_IMAGES']):,} full-size images)",
        "",
        E.get("SCALE_MACHINE", ""),
        "",
        f"**Measured** here: each stage's wall time at N1 and N2 synthetic images on 2 threads from an "
        f"empty store ({E['SCALE_CONFIG']} with the split fractions of {E['SCALE_TARGET']}, CycleGAN "
        f"epochs cut to {E['SCALE_GAN_EPOCHS']}, classifier seeds to {E['SCALE_SEEDS']}, device cpu"
        + (f", `{sets}`" if sets else "") + ")"
        + (f"; the same at {nt:,} images on 1 thread" if "nt_t1" in runs else "")
        + (f" (each stage's fastest of {runs['n1_t2'][1]['reps']} runs)" if runs["n1_t2"][1]["reps"] > 1 else "")
        + f"; ingest and preprocess on two sets of {photos['what']}, on 2"
        + (" and 1 threads" if "nt_t1" in runs else " threads")
        + f", median of {E['SCALE_PHOTO_REPS']}. **Modelled**, not measured: the cost per unit (a + b x units "
        f"through N1 and N2; for ingest and preprocess, per MB of JPEG through the two photo sets), the "
        f"ISIC 2020 units at {E['SCALE_CONFIG']}'s epochs and seeds, and every core count: Amdahl's law "
        f"with the parallel fraction p from the 1 -> 2 thread speedup"
        + (f", the model stages capped at {cap} threads" if capped else "") + ".",
        "",
        *out,
        "",
        "Notes:",
    ]
    notes = [
        f"ISIC 2020 is taken as {int(E['SCALE_IMAGES']):,} rows, {int(E['SCALE_DUPLICATES']):,} duplicate "
        f"pairs dropped ({split['images']:,} images), {int(E['SCALE_MALIGNANT']):,} malignant, split by "
        f"the fractions alone ({1 - split['vf'] - split['tf']:.0%}/{split['vf']:.0%}/{split['tf']:.0%}; "
        f"the patient split moves these by a few percent): about {split['mal']:,} malignant and "
        f"{split['ben']:,} benign training images, {split['val']:,} validation, {split['test']:,} test.",
        f"Full-size JPEGs: ingest and preprocess are modelled per MB of JPEG at {mb:.3f} MB per image "
        f"(SCALE_MB: ISIC 2020's training JPEGs are about 23 GB), on a line through the two photo sets "
        f"that is extended past the larger one; 6000x4000-pixel photos may not cost what their file size "
        f"says. The files were in the page cache: reading 23 GB from disk is not in the model, and with "
        f"many cores ingest and preprocess may wait on the disk instead.",
        "p comes from the 1 -> 2 thread speedup of each stage's total, fixed costs included, on a "
        "machine whose timings vary by about 30% between runs: at 64 cores a p of 0.95 and one of 0.98 "
        "differ by 1.8x. Read the 16- and 64-core columns as an order of magnitude.",
    ]
    if capped:
        notes.append(f"The model stages are capped at {cap} threads (SCALE_KERNEL_CAP): the CPU kernels cut "
                     "each convolution into 8 work units and past that only gemm's own threads share a "
                     "product, at an efficiency not measured; the uncapped total is plain Amdahl.")
    notes += [
        "The classifier's per image-epoch cost includes scoring its validation and test images: that "
        "extrapolates because the measured runs use the real run's split fractions. Fidelity's KID and "
        "probe grow faster than linearly with its set sizes (capped at max_images), which were small "
        "here: its ISIC 2020 time is likely too low.",
        "Fixed costs (a) are counted once per stage, also for the seeds the measured runs left out.",
        "A GPU changes the training rows entirely (README, Machines): this models the CPU.",
    ]
    labels = {"n1_t2": f"{n1:,} images, 2 threads", "n2_t2": f"{n2:,} images, 2 threads",
              "nt_t1": f"{nt:,} images, 1 thread"}
    if nt not in (n1, n2):
        labels["nt_t2"] = f"{nt:,} images, 2 threads"
    use = "; ".join(f"{lab}: " + ", ".join(f"{c:.2f}" for c in runs[t][1]["cpu_per_wall"])
                    for t, lab in labels.items() if t in runs)
    notes.append(f"CPU seconds per wall second of each pipeline run ({use}): a run with a core to itself "
                 "per thread reads near its thread count, less means it waited for the CPU; a shared "
                 "machine skews every number here, the speedups most.")
    load0 = float(E.get("SCALE_LOAD0", "0") or 0)
    if load0 > 0.5:
        notes.append(f"The machine was not idle when this started (load average {load0:.2f}).")
    if slower:
        fit_notes.append("1 thread was faster than 2, so p = 0, for " + ", ".join(slower)
                         + ": the machine was shared (see the CPU use above), and these speedups mean nothing.")
    text += [f"- {n}" for n in notes + fit_notes]
    print("\n".join(text))
    (W / "report.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    {"pipeline": cmd_pipeline, "photos": cmd_photos, "report": cmd_report}[sys.argv[1]](sys.argv[2:])
PYEOF

# ---------------------------------------------------------------------------
THREADS="2 1"
if [ "$NT" = 0 ]; then
    THREADS=2
elif [ "$(nproc)" -lt 2 ]; then
    die "$(nproc) core(s): the 1 -> 2 thread speedup needs 2 (SCALE_THREADS_N=0 skips it)"
fi
export SCALE_BIN=$BIN
export SCALE_MACHINE="$(machine_line)"
SCALE_LOAD0=$(cut -d' ' -f1 /proc/loadavg)
export SCALE_LOAD0
say "scale: photo sets for ingest + preprocess ..."
# shellcheck disable=SC2086
python3 "$PY" photos "$PHOTOS" "$PHOTO_N" "$REPS" $THREADS
say "scale: the pipeline at $N1 and $N2 images on 2 threads$([ "$NT" != 0 ] && echo ", $NT on 1 thread"), $RUNS time(s) ..."
for r in $(seq 1 "$RUNS"); do
    timeout "$TIMEOUT" python3 "$PY" pipeline "n1_t2.r$r" "$N1" 2
    timeout "$TIMEOUT" python3 "$PY" pipeline "n2_t2.r$r" "$N2" 2
    if [ "$NT" != 0 ]; then
        timeout "$TIMEOUT" python3 "$PY" pipeline "nt_t1.r$r" "$NT" 1
        if [ "$NT" != "$N1" ] && [ "$NT" != "$N2" ]; then
            timeout "$TIMEOUT" python3 "$PY" pipeline "nt_t2.r$r" "$NT" 2
        fi
    fi
done
python3 "$PY" report "$N1" "$N2" "$NT" >"$REPORT"
show_report "the runs' stamped lines and stderr"
