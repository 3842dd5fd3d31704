"""Broken checkpoints, full disks and kills, as a user meets them through the ``c2f`` commands.

Every case asserts one line on stderr, exit code 2, no traceback and no output left behind. The checkpoint
is a real two-step ``train-lm`` run (mistral-nano); each case corrupts a copy of its newest step. Resume
falls back past a corrupted newest step at TP2 (each rank checks a slice of the files). The disk-full cases
write onto a 1 MB tmpfs (root only, as in CI). The kill -9 cases kill a conversion and a merge while they
write and rerun them.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from c2f_megatron.checkpoint import manifest
from c2f_megatron.checkpoint.atomic_dir import commit_output, prepare_output, tree_bytes
from tests.launch import WORKERS, free_port, refusal, run_c2f, worker_env
from tests.test_training_resume import lm_config

C2F = [sys.executable, "-m", "c2f_megatron.cli"]


def flip_byte(path: Path, offset: int = 3000) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A train-lm checkpoint root with steps 1 and 2 (model, optimizer, RNG, manifest)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg, overrides = lm_config(tmp, "run", train__train_steps="2", train__save_interval="1")
    proc = run_c2f("train-lm", cfg, *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    root = tmp / "run" / "ckpt"
    assert [p.name for p in sorted(root.iterdir())] == ["step_0000001", "step_0000002"]
    return root


# -------------------------------------------------------------------------------------- the manifest


def test_manifest_records_every_file_and_verify_names_what_is_wrong(tmp_path):
    out = tmp_path / "ckpt"
    tmp = prepare_output(out)
    (tmp / "model").mkdir()
    (tmp / "model" / "a.distcp").write_bytes(os.urandom(70_000))
    (tmp / "model" / "b.distcp").write_bytes(b"x" * 10)
    (tmp / "c2f_checkpoint.json").write_text("{}")
    commit_output(tmp, out)
    records = {r.path: r for r in manifest.read_manifest(out)}
    assert sorted(records) == ["c2f_checkpoint.json", "model/a.distcp", "model/b.distcp"]
    assert records["model/a.distcp"].size == 70_000
    assert (
        manifest.verify(out) == [] and manifest.verify(out / "model") == []
    )  # a part: the parent's manifest

    flip_byte(out / "model" / "a.distcp")
    assert manifest.verify(out, checksums=False) == []  # sizes still match
    (problem,) = manifest.verify(out)
    assert problem.startswith(f"{out / 'model' / 'a.distcp'}: CRC-32 ") and problem.endswith("(corrupted)")
    # a rank's slice of the check sees only its files
    assert len(manifest.verify(out, part=(0, 3)) + manifest.verify(out, part=(1, 3))) == 1
    os.truncate(out / "model" / "b.distcp", 3)
    assert manifest.verify(out / "model", checksums=False) == [
        f"{out / 'model' / 'b.distcp'}: 3 bytes, the manifest records 10 (truncated or replaced)"
    ]
    (out / "c2f_checkpoint.json").unlink()
    assert f"{out / 'c2f_checkpoint.json'}: missing" in manifest.verify(out, checksums=False)[0]


def test_structural_check_without_a_manifest(tmp_path):
    part = tmp_path / "old" / "model"
    part.mkdir(parents=True)
    for name in ("metadata.json", "common.pt", "__0_0.distcp"):
        (part / name).write_bytes(b"x")
    assert manifest.verify(tmp_path / "old") == [
        f"{part / '.metadata'}: missing (distributed checkpoint incomplete)"
    ]


# ------------------------------------------------------------------------------- broken checkpoints


CASES = {
    # case: (damage, what the message must contain)
    "truncated .distcp": (
        lambda s: os.truncate(s / "model" / "__0_0.distcp", 1000),
        "model/__0_0.distcp: 1000 bytes, the manifest records",
    ),
    "deleted .distcp": (lambda s: (s / "model" / "__0_0.distcp").unlink(), "model/__0_0.distcp: missing"),
    "truncated common.pt": (
        lambda s: os.truncate(s / "model" / "common.pt", 100),
        "model/common.pt: 100 bytes, the manifest records",
    ),
    "deleted .metadata": (lambda s: (s / "model" / ".metadata").unlink(), "model/.metadata: missing"),
    "flipped byte": (lambda s: flip_byte(s / "model" / "__0_0.distcp"), "model/__0_0.distcp: CRC-32"),
    "no manifest, truncated .distcp": (
        lambda s: ((s / manifest.MANIFEST_FILE).unlink(), os.truncate(s / "model" / "__0_0.distcp", 1000)),
        "model: cannot load the distributed checkpoint (",
    ),
}


def _damaged_copy(trained: Path, tmp_path: Path, case: str) -> Path:
    step = tmp_path / "src" / "step_0000002"
    shutil.copytree(trained / "step_0000002", step)
    CASES[case][0](step)
    return step


@pytest.mark.parametrize(
    "case", [c for c in CASES if c not in ("flipped byte", "no manifest, truncated .distcp")]
)
def test_the_resolver_refuses_a_broken_checkpoint_before_any_model_is_built(trained, tmp_path, case):
    from c2f_megatron.checkpoint import CheckpointError
    from c2f_megatron.checkpoint.resolve import resolve_checkpoint

    step = _damaged_copy(trained, tmp_path, case)
    with pytest.raises(CheckpointError) as refused:
        resolve_checkpoint(step.parent, field="--megatron-dir")
    assert str(refused.value).startswith(f"--megatron-dir: {step}/") and CASES[case][1] in str(refused.value)


# the command line: the resolver's refusal (sizes), the loader's (CRC-32) and the chunk reader's
@pytest.mark.parametrize("case", ["truncated .distcp", "flipped byte", "no manifest, truncated .distcp"])
def test_convert_refuses_a_broken_checkpoint(trained, tmp_path, case):
    step = _damaged_copy(trained, tmp_path, case)
    message = refusal(run_c2f("convert", "megatron-to-hf", "--megatron-dir", step, "--out", tmp_path / "hf"))
    # the streaming export reads the chunks itself: past a missing manifest it names the chunk
    expected = {
        "no manifest, truncated .distcp": "model/__0_0.distcp: tensor 'embedding.word_embeddings.weight' "
        "chunk at [0, 0] ends at byte "
    }.get(case, CASES[case][1])
    assert (
        message.startswith("c2f convert: error: ")
        and expected in message
        and "(truncated?)" in message
        or (case != "no manifest, truncated .distcp" and expected in message)
    ), message
    assert str(step) in message
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()


@pytest.mark.parametrize("case", ["truncated .distcp", "flipped byte"])
def test_merge_refuses_a_broken_checkpoint(trained, tmp_path, case):
    step = _damaged_copy(trained, tmp_path, case)
    out = tmp_path / "sweep"
    proc = run_c2f("merge", "--a", step, "--b", trained / "step_0000001", "--gamma", "0.3,0.7", "--out", out)
    message = refusal(proc)
    assert message.startswith("c2f merge: error: ") and CASES[case][1] in message, message
    assert not out.exists() and leftovers(tmp_path) == ["src"]


def test_eval_refuses_a_broken_checkpoint(trained, tmp_path, shared_data):
    step = _damaged_copy(trained, tmp_path, "deleted .distcp")
    out = tmp_path / "eval"
    proc = run_c2f(
        "eval", "--checkpoint", step.parent, "--out", out, "responses.enabled=false",
        "benchmarks.names=[arc_easy]", "benchmarks.limit=2", f"benchmarks.data_dir={shared_data}",
    )  # fmt: skip
    message = refusal(proc)
    assert "model/__0_0.distcp: missing" in message and not out.exists(), message


@pytest.mark.parametrize(
    "name, message",
    [
        (".metadata", "not a plain distributed-checkpoint index (it names posix.system); refused"),
        ("common.pt", "not a plain tensor file (Weights only load failed); refused"),
    ],
)
def test_a_crafted_pickle_is_refused_and_never_run(trained, tmp_path, name, message):
    """torch.distributed.checkpoint reads ``.metadata`` with plain ``pickle.load`` and megatron reads
    ``common.pt`` with torch's default: the loader checks both first (here without a manifest, as a crafted
    checkpoint would come)."""
    step = tmp_path / "src" / "step_0000002"
    shutil.copytree(trained / "step_0000002", step)
    (step / manifest.MANIFEST_FILE).unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (step / "model" / name).write_bytes(pickle.dumps(Payload()))
    line = refusal(run_c2f("convert", "megatron-to-hf", "--megatron-dir", step, "--out", tmp_path / "hf"))
    assert f"model/{name}: {message}" in line, line
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_checkpoint_verify_command(trained, tmp_path):
    good = run_c2f("checkpoint", "verify", trained)
    assert good.returncode == 0, good.stderr
    assert good.stdout.count(": OK (") == 2 and "sizes and CRC-32 match" in good.stdout
    step = _damaged_copy(trained, tmp_path, "flipped byte")
    bad = run_c2f("checkpoint", "verify", step)
    assert bad.returncode == 2 and "FAILED (1 problem(s))" in bad.stdout and "CRC-32" in bad.stdout
    assert run_c2f("checkpoint", "verify", step, "--sizes-only").returncode == 0


# ------------------------------------------------------------------------------------------- resume


def test_resume_falls_back_past_a_corrupted_newest_step_at_tp2(tmp_path):
    cfg, overrides = lm_config(tmp_path, "run", train__train_steps="3", train__save_interval="1")
    args = ["train-lm", str(cfg), "parallel.tensor_model_parallel_size=2", *overrides]

    def torchrun() -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(WORKERS / "train_cli.py"), *args]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(1), timeout=400)
        assert proc.returncode == 0, proc.stderr[-6000:]
        return proc

    torchrun()
    root = tmp_path / "run" / "ckpt"
    flip_byte(root / "step_0000003" / "optimizer" / "__1_0.distcp")  # CRC-checked by one rank
    os.truncate(root / "step_0000002" / "model" / "__0_0.distcp", 500)
    proc = torchrun()
    log = proc.stdout + proc.stderr
    assert "resume: skipping step_0000003: " in log and "optimizer/__1_0.distcp: CRC-32" in log, log[-4000:]
    assert "resume: skipping step_0000002: " in log and "model/__0_0.distcp: 500 bytes" in log
    assert "resumed from" in log and "step_0000001 at step 1" in log
    # the skipped steps are kept, under a name nothing resumes from, prunes or overwrites
    names = leftovers(root)
    assert "step_0000003.unverified" in names and "step_0000002.unverified" in names
    assert (root / "step_0000003.unverified" / "trainer_state.json").is_file()
    assert "step_0000003" in names and "step_0000002" in names  # written again by the resumed run
    assert run_c2f("checkpoint", "verify", root).returncode == 0


# --------------------------------------------------------------------------------------- disk full


@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    """A 1 MB tmpfs (needs root, as CI has; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def trained_hf(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "hf"
    proc = run_c2f("convert", "megatron-to-hf", "--megatron-dir", trained / "step_0000002", "--out", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


DISK_FULL = {
    "convert hf-to-megatron": lambda ck, hf, d: ["convert", "hf-to-megatron", "--hf-dir", hf, "--out", d / "m"],
    "convert megatron-to-hf": lambda ck, hf, d: ["convert", "megatron-to-hf", "--megatron-dir", ck, "--out", d / "h"],
    "merge HF gamma sweep": lambda ck, hf, d: ["merge", "--a", hf, "--b", hf, "--gamma", "0.3,0.7", "--out", d / "s"],
    "merge megatron": lambda ck, hf, d: ["merge", "--a", ck, "--b", ck, "--gamma", "0.7", "--out", d / "x" / "g"],
}  # fmt: skip


@pytest.fixture(scope="module")
def native_merge_built() -> None:
    """The native merge kernel compiled into its cache before the runs under test: a first compilation
    prints its own note, which is not part of a refusal."""
    from c2f_megatron.merge import native

    try:
        native.load_library()
    except native.NativeUnavailable:
        pass  # no compiler here: the merge notes its torch fallback on a line of its own


@pytest.mark.parametrize("case", list(DISK_FULL))
def test_disk_full_is_one_line_and_leaves_nothing(trained, trained_hf, tiny_disk, native_merge_built, case):
    message = refusal(run_c2f(*DISK_FULL[case](trained / "step_0000002", trained_hf, tiny_disk)))
    assert f"no space left on {tiny_disk}: need ~" in message and " GB free" in message, message
    assert leftovers(tiny_disk) == []


def test_disk_full_during_a_training_save(tmp_path, tiny_disk):
    cfg, overrides = lm_config(tmp_path, "run", train__train_steps="1")
    message = refusal(run_c2f("train-lm", cfg, *overrides, f"checkpoint.dir={tiny_disk / 'ckpt'}"))
    assert f"no space left on {tiny_disk}: need ~" in message and "step_0000001" in message, message
    assert leftovers(tiny_disk) == []


# ------------------------------------------------------------------------------------------ kill -9


def kill_while_writing(args: list[str], partial: Path, min_bytes: int) -> None:
    """Start ``c2f args``, SIGKILL its whole process group once ``partial`` holds ``min_bytes``."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [*C2F, *map(str, args)], stdout=log, stderr=log, env=worker_env(2), start_new_session=True
        )
        deadline = time.time() + 300
        try:
            while time.time() < deadline and proc.poll() is None:
                if tree_bytes(partial) >= min_bytes:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.005)
        finally:
            proc.wait(timeout=60)
        log.seek(0)
        assert proc.returncode == -signal.SIGKILL, f"not killed while writing: {log.read()[-2000:]}"


def test_kill_during_conversion_and_merge_leaves_nothing_complete(smollm2_hf, tmp_path):
    meg = tmp_path / "smollm2"
    args = ["convert", "hf-to-megatron", "--hf-dir", smollm2_hf, "--out", meg]
    kill_while_writing(args, tmp_path / "smollm2.partial", 50 << 20)
    assert not meg.exists()
    assert run_c2f("checkpoint", "verify", tmp_path / "smollm2.partial").returncode == 2  # never complete
    proc = run_c2f(*args)  # the rerun clears the stale .partial and completes
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert leftovers(tmp_path) == ["smollm2"] and run_c2f("checkpoint", "verify", meg).returncode == 0

    fine = tmp_path / "fine"
    args = ["merge", "--a", smollm2_hf, "--b", smollm2_hf, "--gamma", "0.7", "--out", fine]
    kill_while_writing(args, tmp_path / "fine.partial", 50 << 20)
    assert not fine.exists()
    proc = run_c2f(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        leftovers(tmp_path) == ["fine", "smollm2"] and run_c2f("checkpoint", "verify", fine).returncode == 0
    )


def test_a_truncated_safetensors_shard_is_named(trained_hf, tmp_path):
    """HF directories: against the manifest when there is one, else against the shard's own header."""
    from c2f_megatron.checkpoint import CheckpointError
    from c2f_megatron.checkpoint.hf_dir import open_hf_checkpoint

    hf = tmp_path / "hf"
    shutil.copytree(trained_hf, hf)
    shard = sorted(hf.glob("*.safetensors"))[0]
    os.truncate(shard, shard.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=rf"^{shard}: \d+ bytes, the manifest records \d+ \(truncated"):
        open_hf_checkpoint(hf, CheckpointError)
    (hf / manifest.MANIFEST_FILE).unlink()
    with pytest.raises(
        CheckpointError,
        match=rf"^{shard}: tensor '.+': data offsets \d+\.\.\d+ beyond the file \(truncated\?\)",
    ):
        open_hf_checkpoint(hf, CheckpointError)
