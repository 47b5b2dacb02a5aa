"""Building and fuzzing the modules' pure parsers outside nginx:
compiled against the configured nginx tree's headers (build/nginx-src,
made by 'make'), under ASan and UBSan, in the three ways their string
skipping can be built."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# the configured tree the modules were built in (make's BUILD/nginx-src)
TREE = Path(os.environ.get("INFER_NGINX_TREE",
                           REPO / "build" / "nginx-src"))
UNIT = REPO / "t" / "unit"

# the directories of any configured tree: src/event/quic is there, and
# needed by ngx_event.h, from 1.25 on when configured --with-http_v3_module
INCLUDES = [f"-I{TREE / d}" for d in
            ("src/core", "src/event", "src/event/modules", "src/event/quic",
             "src/os/unix", "objs", "src/http", "src/http/modules",
             "src/http/v2", "src/http/v3")
            if d == "objs" or (TREE / d).is_dir()] + [
                f"-I{REPO / d}" for d in
                ("ngx_infer_common", "ngx_infer_route", "ngx_infer_balance",
                 "ngx_infer_auth", "ngx_infer_ratelimit")]

# ngx_http_infer_route_lex.h's three ways of skipping bytes: SSE2 (on
# x86-64), 64-bit words, 64-bit words without the little-endian shortcut
VARIANTS = {"sse2": [], "swar": ["-U__SSE2__"],
            "portable": ["-U__SSE2__", "-DNGX_HAVE_LITTLE_ENDIAN=0"]}

SANITIZED = ["-O1", "-g", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
             "-Wall", "-Werror"]


def compile_c(out, sources, flags, cc="gcc", libs=()):
    if not (TREE / "objs" / "ngx_auto_config.h").exists():
        pytest.fail(f"no configured nginx tree at {TREE}: run 'make' first",
                    pytrace=False)
    cmd = [cc, *flags, *INCLUDES, *map(str, sources), *libs, "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, " ".join(cmd) + "\n" + r.stderr
    return out


def build_sanitized(out, sources, variant):
    """A CLI under ASan and UBSan, with one of the VARIANTS."""
    return compile_c(out, sources, SANITIZED + VARIANTS[variant])


def fuzz(tmp_path, sources, corpus, dictionary, seconds=5, args=(),
         flags=(), libs=()):
    """Builds the libFuzzer harness in sources with clang (and flags,
    libs), runs it over a copy of corpus with the dictionary text for a
    bounded time, and fails the test on any crash.  Skips when clang or
    its runtime is missing.  Returns the harness."""
    clang = shutil.which("clang") or shutil.which("clang-14")
    if clang is None:
        pytest.skip("clang is not installed")
    probe = tmp_path / "probe.c"
    probe.write_text("int LLVMFuzzerTestOneInput(const unsigned char *d, "
                     "unsigned long n) { return 0; }\n")
    r = subprocess.run([clang, "-fsanitize=fuzzer", str(probe), "-o",
                        str(tmp_path / "probe")], capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip("clang's libFuzzer runtime is missing: "
                    + r.stderr[-500:])

    binary = compile_c(tmp_path / "fuzz", sources,
                       ["-g", "-O1", "-fsanitize=fuzzer,address,undefined",
                        "-fno-sanitize-recover=all", "-Wall", "-Werror",
                        *flags],
                       cc=clang, libs=libs)
    work = tmp_path / "corpus"
    shutil.copytree(corpus, work)
    dict_file = tmp_path / "fuzz.dict"
    dict_file.write_text(dictionary)

    r = subprocess.run([str(binary), str(work),
                        f"-max_total_time={seconds}",
                        "-print_final_stats=1", "-timeout=10", *args,
                        f"-dict={dict_file}", f"-artifact_prefix={tmp_path}/"],
                       cwd=tmp_path, capture_output=True, text=True,
                       timeout=seconds + 105)
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", r.stderr)
    print(f"\nfuzz: {runs.group(1) if runs else '?'} executions"
          f" (-max_total_time={seconds}), corpus"
          f" {len(list(work.iterdir()))} inputs")
    assert r.returncode == 0, r.stderr[-6000:]
    return binary
