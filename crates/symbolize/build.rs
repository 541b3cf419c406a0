//! Links libiberty, the GNU demangler that c++filt, addr2line, gdb and
//! perf use, so C++ names read exactly as those tools print them (issue
//! 14: cpp_demangle differs from c++filt on about 5% of libstdc++'s own
//! symbols, dropping parameters and misplacing references).

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");
    // The C compiler knows where the system keeps its static libraries
    // (Debian's libiberty-dev: /usr/lib/x86_64-linux-gnu/libiberty.a).
    let cc = std::env::var("CC")
        .ok()
        .filter(|cc| !cc.is_empty())
        .unwrap_or_else(|| "cc".to_owned());
    let found = Command::new(&cc)
        .arg("-print-file-name=libiberty.a")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|p| Path::new(p).is_absolute() && Path::new(p).is_file());
    let Some(lib) = found else {
        panic!(
            "libiberty.a not found by `{cc} -print-file-name=libiberty.a`: \
             install libiberty-dev (Debian, Ubuntu; scripts/setup does) \
             or libiberty-devel/binutils-devel (Fedora)"
        );
    };
    let dir = Path::new(&lib)
        .parent()
        .expect("an absolute path has a parent");
    println!("cargo:rustc-link-search=native={}", dir.display());
    println!("cargo:rustc-link-lib=static=iberty");
}
