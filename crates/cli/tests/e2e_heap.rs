//! End to end for heap leaks through `leakscope run`: the preload backend
//! alone (no privileges) and together with eBPF for fds on one launch.

use std::path::{Path, PathBuf};
use std::process::Command;

use leakscope_testutil::{fixture, require_root, workspace_root};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_leakscope");

fn ensure_shim() {
    leakscope_testutil::ensure_shim(Path::new(BIN));
}

fn heap_fixture(name: &str) -> PathBuf {
    heap_fixture_with(name, &[])
}

/// [`heap_fixture`] with extra compiler arguments (libraries, after the
/// source).
fn heap_fixture_with(name: &str, extra: &[&str]) -> PathBuf {
    heap_fixture_as(name, name, extra)
}

/// [`heap_fixture_with`], built under its own name `tag`: tests running
/// at the same time each remove their own copy.
fn heap_fixture_as(name: &str, tag: &str, extra: &[&str]) -> PathBuf {
    let out = workspace_root().join("target/fixtures");
    std::fs::create_dir_all(&out).unwrap();
    let bin = out.join(format!("heap-{tag}-{}", std::process::id()));
    let src = workspace_root().join(format!("fixtures/heap/{name}.c"));
    let st = Command::new("cc")
        .args(["-g", "-O2", "-fomit-frame-pointer", "-pthread", "-o"])
        .arg(&bin)
        .arg(&src)
        .args(extra)
        .status()
        .expect("run cc");
    assert!(st.success(), "compiling {}", src.display());
    bin
}

fn report(args: &[&str], cmd: &Path) -> Value {
    ensure_shim();
    let out_path = std::env::temp_dir().join(format!(
        "leakscope-heap-{}-{}.json",
        std::process::id(),
        cmd.file_name().unwrap().to_string_lossy()
    ));
    let mut all = vec!["run", "--format", "json", "-o", out_path.to_str().unwrap()];
    all.extend_from_slice(args);
    all.push("--");
    all.push(cmd.to_str().unwrap());
    let out = Command::new(BIN)
        .args(&all)
        .output()
        .expect("run leakscope");
    let text = std::fs::read_to_string(&out_path).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let _ = std::fs::remove_file(&out_path);
    serde_json::from_str(&text).expect("JSON")
}

fn functions(g: &Value) -> Vec<String> {
    g["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["function"].as_str().map(str::to_string))
        .collect()
}

/// Seed 003: wrapper1 leaks 13 x 64 bytes through strdup in parse_line;
/// wrapper2's blocks are freed and must not appear. No privileges needed.
#[test]
fn heap_leaks_with_the_preload_backend() {
    let bin = heap_fixture("nested");
    let r = report(&["--backend", "preload", "--track", "heap"], &bin);
    assert_eq!(r["backend"], "preload");
    assert_eq!(r["events"]["lost"], 0);
    let leaks = r["leaks"].as_array().unwrap();
    assert_eq!(leaks.len(), 1, "exactly one leaking stack: {leaks:#?}");
    let g = &leaks[0];
    assert_eq!(
        (g["kind"].as_str(), g["count"].as_u64()),
        (Some("heap"), Some(13))
    );
    assert_eq!(g["bytes"], 832);
    let f = functions(g);
    let at = |n: &str| f.iter().position(|x| x == n);
    assert!(
        at("parse_line") < at("wrapper1")
            && at("wrapper1") < at("main")
            && at("parse_line").is_some(),
        "stack {f:?}"
    );
    assert!(!f.iter().any(|x| x == "wrapper2" || x == "balanced_alloc"));
    let _ = std::fs::remove_file(bin);
}

/// fds from eBPF and heap from the shim on one launch: an fopen() that is
/// never fclose()d leaks both the fd and the FILE.
#[test]
fn root_fd_and_heap_together() {
    if !require_root("root_fd_and_heap_together") {
        return;
    }
    let r = report(&["--track", "fd,heap"], &fixture("fd_leak"));
    assert_eq!(r["backend"], "ebpf+preload");
    let leaks = r["leaks"].as_array().unwrap();
    let count = |kind: &str, funcs: &[&str]| -> u64 {
        leaks
            .iter()
            .filter(|g| {
                let f = functions(g);
                g["kind"] == kind && funcs.iter().all(|want| f.iter().any(|x| x == want))
            })
            .map(|g| g["count"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(count("fd", &["load_config"]), 23);
    // Each fopen allocates its FILE (and the first read a buffer, also leaked).
    assert_eq!(count("heap", &["__fopen_internal", "load_config"]), 23);
    assert_eq!(count("fd", &["scan_dir"]), 5);
    assert_eq!(count("heap", &["scan_dir"]), 5, "one DIR per opendir");
    // The shim's own connection to leakscope is not the program's leak.
    let fds: u64 = leaks
        .iter()
        .filter(|g| g["kind"] == "fd")
        .map(|g| g["count"].as_u64().unwrap())
        .sum();
    assert_eq!(fds, 34, "fd leaks: {leaks:#?}");
}

/// Rust code allocating through the system allocator: demangled names, and
/// the function named in the report is the program's, not `alloc::`.
#[test]
fn rust_heap_leaks_with_the_preload_backend() {
    let out = workspace_root().join("target/fixtures");
    std::fs::create_dir_all(&out).unwrap();
    let bin = out.join(format!("rust_leak-{}", std::process::id()));
    let st = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["-O", "-g", "-C", "force-frame-pointers=no", "-o"])
        .arg(&bin)
        .arg(workspace_root().join("fixtures/heap/rust_leak.rs"))
        .status()
        .expect("run rustc");
    assert!(st.success(), "rustc failed");
    let r = report(&["--backend", "preload", "--track", "heap"], &bin);
    let _ = std::fs::remove_file(&bin);
    let mut got = std::collections::BTreeMap::new();
    for g in r["leaks"].as_array().unwrap() {
        let f = functions(g);
        assert!(!f.iter().any(|x| x == "rust_leak::balanced"), "{g}");
        // std's own table for its stack-overflow handler is suppressed.
        assert!(!f.iter().any(|x| x.contains("stack_overflow")), "{g}");
        for who in ["rust_leak::cache_names", "rust_leak::grow_table"] {
            if f.iter().any(|x| x == who) {
                let e = got.entry(who).or_insert((0, 0));
                e.0 += g["count"].as_u64().unwrap();
                e.1 += g["bytes"].as_u64().unwrap();
            }
        }
    }
    assert_eq!(
        got,
        std::collections::BTreeMap::from([
            ("rust_leak::cache_names", (11, 11 * 48)),
            ("rust_leak::grow_table", (6, 3 * 800 + 3 * 24)),
        ])
    );
}

/// The (group, count, bytes) of each reported leak, by culprit function.
fn groups_by_function(r: &Value) -> Vec<(Vec<String>, u64, u64)> {
    r["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                functions(g),
                g["count"].as_u64().unwrap(),
                g["bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// glibc's caches (locale, stdout's buffer, a joined thread's TLS vector,
/// NSS, timezone) are suppressed by default and counted as suppressed; the
/// program's leaks are reported exactly, including the buffer of a FILE it
/// never closed, allocated exactly like stdout's. `--no-default-suppressions`
/// shows glibc's blocks again, and a user's LeakSanitizer-format file takes
/// out the group it names, counted under its own FILE:LINE.
#[test]
fn glibc_caches_are_suppressed_and_counted() {
    let bin = heap_fixture("glibc_caches");
    let heap = ["--backend", "preload", "--track", "heap"];
    let has = |g: &(Vec<String>, u64, u64), f: &str| g.0.iter().any(|x| x == f);

    let r = report(&heap, &bin);
    let groups = groups_by_function(&r);
    assert_eq!(groups.len(), 4, "only the program's leaks: {groups:#?}");
    let mine = groups
        .iter()
        .find(|g| has(g, "leak_mine"))
        .expect("leak_mine");
    assert_eq!((mine.1, mine.2), (7, 168));
    let cache = groups
        .iter()
        .find(|g| has(g, "cache_fill"))
        .expect("cache_fill");
    assert_eq!((cache.1, cache.2), (5, 200));
    // The FILE (fopen) and its buffer (the first read).
    let file: Vec<_> = groups.iter().filter(|g| has(g, "leak_file")).collect();
    assert_eq!(file.len(), 2, "{file:#?}");
    assert!(file.iter().all(|g| g.1 == 1));
    assert!(file
        .iter()
        .any(|g| has(g, "__fopen_internal") && g.2 == 472));
    assert!(file.iter().any(|g| has(g, "__GI__IO_file_doallocate")));
    let suppressed = r["suppressed"].as_array().unwrap();
    assert!(suppressed.iter().all(|s| s["origin"] == "default"));
    assert!(
        suppressed
            .iter()
            .any(|s| s["pattern"] == "<stdout's buffer, kept by glibc>" && s["count"] == 1),
        "stdout's buffer is glibc's: {suppressed:#?}"
    );
    assert!(
        suppressed.len() > 1,
        "glibc's caches were seen and suppressed"
    );
    let hidden: u64 = suppressed
        .iter()
        .map(|s| s["count"].as_u64().unwrap())
        .sum();

    let all = report(&[&heap[..], &["--no-default-suppressions"]].concat(), &bin);
    assert_eq!(all["suppressed"].as_array().unwrap().len(), 0);
    let every = groups_by_function(&all);
    let total: u64 = every.iter().map(|g| g.1).sum();
    assert_eq!(
        total,
        7 + 5 + 2 + hidden,
        "the same blocks, none suppressed: {every:#?}"
    );
    assert!(every.iter().any(|g| has(g, "leak_mine")));

    let supp = std::env::temp_dir().join(format!("leakscope-{}.supp", std::process::id()));
    std::fs::write(&supp, "# kept on purpose\nleak:^cache_fill$\n").unwrap();
    let file = supp.to_str().unwrap();
    let r = report(&[&heap[..], &["--suppressions", file]].concat(), &bin);
    let groups = groups_by_function(&r);
    assert_eq!(groups.len(), 3, "{groups:#?}");
    assert!(!groups.iter().any(|g| has(g, "cache_fill")));
    let mine = r["suppressed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["origin"] == format!("{file}:2"))
        .expect("the user's rule is counted")
        .clone();
    assert_eq!(
        (
            &mine["pattern"],
            &mine["groups"],
            &mine["count"],
            &mine["bytes"]
        ),
        (
            &Value::from("^cache_fill$"),
            &Value::from(1),
            &Value::from(5),
            &Value::from(200)
        )
    );
    let _ = std::fs::remove_file(supp);
    let _ = std::fs::remove_file(bin);
}

/// A suppressions file that is not one: a one-line error and exit 125,
/// before the command runs.
#[test]
fn a_bad_suppressions_file_is_a_clear_error() {
    let supp = std::env::temp_dir().join(format!("leakscope-bad-{}.supp", std::process::id()));
    std::fs::write(&supp, "leak:ok\nleak foo\n").unwrap();
    let marker = std::env::temp_dir().join(format!("leakscope-ran-{}", std::process::id()));
    let out = Command::new(BIN)
        .args([
            "run",
            "--track",
            "heap",
            "--backend",
            "preload",
            "--suppressions",
        ])
        .arg(&supp)
        .args(["--", "touch"])
        .arg(&marker)
        .output()
        .expect("run leakscope");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert_eq!(
        err.trim(),
        format!(
            "leakscope: error: {}:2: `leak foo` is not `leak:PATTERN`",
            supp.display()
        )
    );
    assert!(!marker.exists(), "the command must not run");
    let _ = std::fs::remove_file(supp);
}

/// A LeakSanitizer file shared with AddressSanitizer (and TSan, UBSan)
/// holds their types too: they are skipped with one warning line naming
/// them, before the command runs; its `leak:` lines still apply.
#[test]
fn other_sanitizers_suppressions_are_skipped_with_a_warning() {
    ensure_shim();
    let bin = heap_fixture_as("glibc_caches", "glibc_caches-asan", &[]);
    let supp = std::env::temp_dir().join(format!("leakscope-asan-{}.supp", std::process::id()));
    std::fs::write(
        &supp,
        "# shared with ASAN_OPTIONS=suppressions=...\n\
         leak:^cache_fill$\n\
         called_from_lib:libfoo.so\n\
         interceptor_via_fun:parse_config\n\
         interceptor_name:strlen\n\
         odr_violation:^g_table$\n\
         interceptor_via_lib:libbar.so\n\
         race:^worker_loop$\n\
         interceptor_via_fun:read_all\n",
    )
    .unwrap();
    let out_path = std::env::temp_dir().join(format!("leakscope-asan-{}.json", std::process::id()));
    let out = Command::new(BIN)
        .args(["run", "--backend", "preload", "--track", "heap"])
        .arg("--suppressions")
        .arg(&supp)
        .args(["--format", "json", "-o"])
        .arg(&out_path)
        .arg("--")
        .arg(&bin)
        .output()
        .expect("run leakscope");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(
        err.lines().next(),
        Some(
            format!(
                "leakscope: warning: {}: ignored 7 lines of types `called_from_lib`, \
                 `interceptor_via_fun`, `interceptor_name`, `odr_violation`, \
                 `interceptor_via_lib`, `race` (other sanitizers' suppressions; \
                 leakscope reads `leak` and `leak-init`)",
                supp.display()
            )
            .as_str()
        ),
        "{err}"
    );
    assert_eq!(err.matches("warning").count(), 1, "{err}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    let groups = groups_by_function(&r);
    assert!(!groups.iter().any(|g| g.0.iter().any(|f| f == "cache_fill")));
    let mine: Vec<&Value> = r["suppressed"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["origin"] != "default")
        .collect();
    assert_eq!(mine.len(), 1, "{mine:#?}");
    assert_eq!(mine[0]["origin"], format!("{}:2", supp.display()));
    assert_eq!(
        (&mine[0]["count"], &mine[0]["bytes"]),
        (&Value::from(5), &Value::from(200))
    );
    let _ = std::fs::remove_file(supp);
    let _ = std::fs::remove_file(out_path);
    let _ = std::fs::remove_file(bin);
}

/// A program linked with jemalloc keeps jemalloc under the shim (the
/// fixture checks each block with jemalloc's own sallocx and exits 1 or
/// crashes otherwise; forwarding to glibc's allocator crashed it), and its
/// leak is found exactly.
#[test]
fn a_program_linked_with_jemalloc_keeps_its_allocator() {
    let bin = heap_fixture_with("jemalloc", &["-ljemalloc"]);
    let r = report(&["--backend", "preload", "--track", "heap"], &bin);
    assert_eq!(
        r["target"]["exit_code"], 0,
        "the program ran as without leakscope"
    );
    let own: Vec<_> = groups_by_function(&r)
        .into_iter()
        .filter(|g| {
            g.0.iter()
                .any(|f| f == "leak_je" || f == "balanced_je" || f == "main")
        })
        .collect();
    assert_eq!(own.len(), 1, "{own:#?}");
    assert!(own[0].0.iter().any(|f| f == "leak_je"));
    assert_eq!((own[0].1, own[0].2), (11, 528));
    let _ = std::fs::remove_file(bin);
}

/// An executable that defines malloc itself is ahead of the shim: the
/// report says its allocations are not seen instead of only "no leaks".
#[test]
fn a_malloc_the_shim_cannot_interpose_is_reported() {
    let bin = heap_fixture("own_malloc");
    let r = report(&["--backend", "preload", "--track", "heap"], &bin);
    assert_eq!(r["target"]["exit_code"], 0);
    let notes: Vec<&str> = r["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    let path = bin.to_str().unwrap();
    assert!(
        notes.iter().any(|n| n.contains(&format!(
            "malloc is defined by {path}, ahead of the preload shim"
        ))),
        "{notes:?}"
    );
    let _ = std::fs::remove_file(bin);
}

/// A non-PIE executable that takes malloc's address only has malloc's PLT
/// stub: an undefined `malloc` whose value is the stub's address (Debian's
/// python3 is built so). That is not a malloc of its own: the shim sees
/// every allocation, and there is no note saying it does not (issue 10).
/// The same executable defining malloc itself still gets the note.
#[test]
fn a_non_pie_executable_with_a_malloc_plt_stub_is_traced_without_a_note() {
    let dir = workspace_root().join("target/fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("plt_stub-{}.c", std::process::id()));
    std::fs::write(
        &src,
        "#include <stdlib.h>\n\
         void *(*volatile allocate)(size_t);\n\
         static void *volatile keep[7];\n\
         __attribute__((noinline)) void leak_through_pointer(void) {\n\
           for (int i = 0; i < 7; i++) keep[i] = allocate(48);\n\
         }\n\
         int main(void) {\n\
           allocate = malloc; /* non-PIC code: a canonical PLT entry */\n\
           leak_through_pointer();\n\
           return 0;\n\
         }\n",
    )
    .unwrap();
    let bin = dir.join(format!("plt_stub-{}", std::process::id()));
    let st = Command::new("cc")
        .args(["-g", "-O2", "-no-pie", "-fno-pie", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("run cc");
    assert!(st.success());
    // The case itself: malloc undefined (UND) with the stub's address.
    let syms = Command::new("readelf")
        .args(["--dyn-syms", "-W"])
        .arg(&bin)
        .output()
        .expect("readelf (binutils)");
    let syms = String::from_utf8_lossy(&syms.stdout);
    let malloc = syms
        .lines()
        .find(|l| l.contains(" malloc@"))
        .unwrap_or_else(|| panic!("{syms}"));
    let f: Vec<&str> = malloc.split_whitespace().collect();
    assert_eq!(f[6], "UND", "{malloc}");
    assert_ne!(u64::from_str_radix(f[1], 16).unwrap(), 0, "{malloc}");

    let r = report(&["--backend", "preload", "--track", "heap"], &bin);
    assert_eq!(r["notes"], Value::Array(vec![]), "{}", r["notes"]);
    assert_eq!(r["coverage"][1]["traced"], "all");
    let groups = groups_by_function(&r);
    let mine: Vec<_> = groups
        .iter()
        .filter(|g| g.0.iter().any(|f| f == "leak_through_pointer"))
        .collect();
    assert_eq!(mine.len(), 1, "{groups:#?}");
    assert_eq!((mine[0].1, mine[0].2), (7, 336));
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&bin);

    // A real definition in a non-PIE executable: the note stays.
    let own = heap_fixture_as("own_malloc", "own_malloc-nopie", &["-no-pie", "-fno-pie"]);
    let r = report(&["--backend", "preload", "--track", "heap"], &own);
    let notes = r["notes"].to_string();
    assert!(
        notes.contains(&format!(
            "malloc is defined by {}, ahead of the preload shim",
            own.display()
        )),
        "{notes}"
    );
    let _ = std::fs::remove_file(own);
}

/// `leakscope run` with no --track traces fds (eBPF) and the heap (the
/// shim) together: the demo's 17 FILEs opened and never closed are 17 file
/// fds, 17 FILE structs and 17 stdio buffers, all from read_settings.
#[test]
fn root_a_plain_run_tracks_fds_and_heap() {
    if !require_root("root_a_plain_run_tracks_fds_and_heap") {
        return;
    }
    let r = report(&[], &fixture("demo"));
    assert_eq!(r["backend"], "ebpf+preload");
    let from_settings = |kind: &str| -> Vec<u64> {
        r["leaks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["kind"] == kind && functions(g).iter().any(|f| f == "read_settings"))
            .map(|g| g["count"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(from_settings("fd"), [17]);
    assert_eq!(
        from_settings("heap"),
        [17, 17],
        "the FILEs and their buffers"
    );
}

/// Without permission for eBPF, a plain `run` traces the heap with the
/// shim and fds with ptrace (issue 13), and names `--backend auto`'s
/// reason in a note. Runs leakscope as nobody (setpriv), from a copy it
/// may execute.
#[test]
fn root_without_ebpf_a_plain_run_traces_the_heap() {
    if !require_root("root_without_ebpf_a_plain_run_traces_the_heap") {
        return;
    }
    ensure_shim();
    let dir = std::env::temp_dir().join(format!("leakscope-nobody-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin_dir = Path::new(BIN).parent().unwrap();
    for f in ["leakscope", leakscope_preload::SHIM_NAME] {
        std::fs::copy(bin_dir.join(f), dir.join(f)).unwrap();
    }
    let prog = dir.join("nested");
    std::fs::copy(heap_fixture("nested"), &prog).unwrap();
    let out_path = dir.join("report.json");
    std::fs::write(&out_path, "").unwrap();
    let chmod = Command::new("chmod")
        .arg("-R")
        .arg("a+rwx")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(chmod.success());
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(dir.join("leakscope"))
            .args(args)
            .arg("--")
            .arg(&prog)
            .output()
            .expect("setpriv (util-linux)")
    };
    let out = as_nobody(&["run", "--format", "json", "-o", out_path.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    assert_eq!(r["backend"], "ptrace+preload");
    let fd = &r["coverage"][0];
    assert_eq!(
        (&fd["kind"], &fd["requested"], &fd["traced"]),
        (&Value::from("fd"), &Value::from(true), &Value::from("all")),
        "{fd}"
    );
    assert!(r["notes"][0].as_str().unwrap().contains("CAP_BPF"), "{r:#}");
    assert_eq!(r["coverage"][1]["traced"], "all");
    let groups = groups_by_function(&r);
    assert!(
        groups
            .iter()
            .any(|g| g.0.iter().any(|f| f == "wrapper1") && g.1 == 13),
        "{groups:#?}"
    );
    let out = as_nobody(&["run", "--track", "fd"]);
    assert_eq!(out.status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Heap blocks allocated under 200 nested calls with 1 KiB frames: the
/// shim keeps the innermost and outermost frames of the stack (main among
/// them) and says how many it left out between them.
#[test]
fn a_deep_stack_keeps_its_outer_frames() {
    let bin = fixture("deep_stack");
    let r = report(&["--backend", "preload", "--track", "heap"], &bin);
    let groups: Vec<&Value> = r["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| functions(g).iter().any(|f| f == "leak_deep"))
        .collect();
    assert_eq!(groups.len(), 1, "one call site, one group: {groups:#?}");
    let g = groups[0];
    assert_eq!(
        (g["count"].as_u64(), g["bytes"].as_u64()),
        (Some(5), Some(320))
    );
    let f = functions(g);
    assert!(f.iter().any(|f| f == "descend"), "{f:?}");
    assert!(f.iter().any(|f| f == "main"), "the outermost frame: {f:?}");
    let note = g["stack_note"].as_str().unwrap_or_default();
    assert!(
        note.contains("frames deep:") && note.contains("frames left out between #46 and #47"),
        "{note}"
    );
}

/// execve(2) frees the old image's memory: a program's blocks before it
/// execs itself are not leaks (valgrind does not report them either), the
/// new image's are; the report says how many it left out and why.
#[test]
fn execve_frees_the_old_images_heap() {
    let bin = heap_fixture("exec_chain");
    let r = report(&["--backend", "preload", "--track", "heap"], &bin);
    let mut counts = std::collections::BTreeMap::new();
    for g in r["leaks"].as_array().unwrap() {
        let f = functions(g);
        for name in ["before_exec", "after_exec"] {
            if f.iter().any(|x| x == name) {
                *counts.entry(name).or_insert(0) += g["count"].as_u64().unwrap();
            }
        }
    }
    assert_eq!(
        counts,
        std::collections::BTreeMap::from([("after_exec", 5)]),
        "{r:#}"
    );
    let notes = r["notes"].to_string();
    assert!(
        notes.contains("held by program images that execve replaced are not leaks"),
        "{notes}"
    );
}

/// The blocks of fixtures/coroutine.c, by leaking function: (count, bytes,
/// the stack's functions, its note).
fn coroutine_groups(r: &Value) -> Vec<(u64, u64, Vec<String>, Option<String>)> {
    let mut groups: Vec<_> = r["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["count"].as_u64().unwrap(),
                g["bytes"].as_u64().unwrap(),
                functions(g),
                g["stack_note"].as_str().map(str::to_string),
            )
        })
        .collect();
    groups.sort();
    groups
}

/// Blocks allocated on stacks the program allocated (fixtures/coroutine.c):
/// makecontext contexts on a malloc'd stack, an mmap'd one and one in
/// main's frame, and a signal handler on sigaltstack. Every block is
/// reported; a context's stack ends at glibc's `__start_context` after the
/// function the context ran, with nothing past it (on main's frame, main's
/// own frames lie beyond it); the handler's goes through the signal frame
/// on to the code it interrupted.
#[test]
fn coroutine_and_signal_stacks() {
    let bin = fixture("coroutine");
    let r = report(&["--backend", "preload", "--track", "heap"], &bin);
    assert_eq!(r["events"]["lost"], 0);
    let groups = coroutine_groups(&r);
    let context = |leak: &str, run: &str| -> Vec<String> {
        ["malloc", leak, run, "__start_context"]
            .map(String::from)
            .to_vec()
    };
    let [handler, heap, mmap, main] = &groups[..] else {
        panic!("4 groups expected: {groups:#?}");
    };
    assert_eq!(
        [heap, mmap, main].map(|g| g.clone()),
        [
            (3, 144, context("leak_on_heap", "run_on_heap"), None),
            (5, 400, context("leak_on_mmap", "run_on_mmap"), None),
            (7, 784, context("leak_on_main", "run_on_main"), None),
        ]
    );
    let (count, bytes, f, note) = handler;
    assert_eq!((*count, *bytes, note), (2, 288, &None), "{f:?}");
    // libc's frames between __restore_rt and send_signal (raise and what
    // it calls) differ between glibc versions.
    assert_eq!(
        f[..4],
        ["malloc", "leak_in_handler", "on_signal", "__restore_rt"],
        "{f:?}"
    );
    let at = f.iter().position(|f| f == "send_signal");
    assert!(
        at.is_some_and(|at| f[at + 1] == "main" && at > 4),
        "the interrupted code, send_signal called by main: {f:?}"
    );
}

/// Where process_vm_readv(2) is denied (a seccomp policy), the shim cannot
/// read a stack other than the thread's own: each block allocated on one
/// is still reported, without a stack, and the note says why; blocks on
/// the thread's stack (the context in main's frame) keep theirs.
#[test]
fn a_stack_the_shim_cannot_read_is_said_so() {
    let wrapper = heap_fixture("no_vm_readv");
    let bin = fixture("coroutine");
    ensure_shim();
    let out_path = std::env::temp_dir().join(format!(
        "leakscope-heap-{}-no_vm_readv.json",
        std::process::id()
    ));
    let out = Command::new(BIN)
        .args(["run", "--backend", "preload", "--track", "heap"])
        .args(["--format", "json", "-o"])
        .arg(&out_path)
        .arg("--")
        .arg(&wrapper)
        .arg(&bin)
        .output()
        .expect("run leakscope");
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&wrapper);
    assert_eq!(
        coroutine_groups(&r),
        [
            (
                7,
                784,
                ["malloc", "leak_on_main", "run_on_main", "__start_context"]
                    .map(String::from)
                    .to_vec(),
                None
            ),
            (
                10,
                832,
                vec![],
                Some("not taken: its coroutine or signal stack is unreadable (EPERM)".into())
            ),
        ]
    );
}
