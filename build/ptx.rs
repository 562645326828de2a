//! The PTX half of the build script: `kernels/*.cu` → PTX (NVRTC) → ptxas resource report, and
//! `$OUT_DIR/kernels_build.rs` for `src/device/kernels.rs`.
//!
//! One compiler path: NVRTC, loaded with `libloading` (a CUDA toolkit that has `nvcc` also has
//! `libnvrtc`, so `nvcc` is not used). NVRTC, ptxas and the CUDA headers are searched in order
//! in: `$LORAFUSE_CUDA_TOOLS` (default: the repo's `.tools/cuda`, the pip-wheel layout that
//! `scripts/test.sh` installs), `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda` (toolkit layout),
//! the directories of `$LD_LIBRARY_PATH` and `$PATH`, and last the ldconfig cache. Without NVRTC
//! the build embeds only the sources, which the runtime compiles with NVRTC at first use, unless
//! `LORAFUSE_REQUIRE_PTX=1` makes that a failure. ptxas then checks every kernel for sm_80 and
//! sm_90: any spill fails the build; the table goes to `$OUT_DIR/ptxas_report.txt` (and to the
//! build log with `LORAFUSE_PTXAS_REPORT=1`).
//!
//! Minimum driver: a driver refuses PTX whose ISA is newer than its own CUDA version. NVRTC 12.4
//! (the pin) emits PTX ISA 8.4, introduced with CUDA 12.4 (PTX ISA manual, "Release Notes" /
//! PTX release history: 8.4 ↔ CUDA 12.4), and CUDA 12.4 needs a Linux driver of branch R550
//! (≥ 550.54.14, CUDA 12.4 release notes, "CUDA Toolkit and Corresponding Driver Versions").
//! [`min_driver`] maps the ISA the build saw to that branch; it goes into `BUILD_DETAIL`.

#[path = "kernel_names.rs"]
mod kernel_names;

use libloading::Library;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs, ptr};

/// Architectures ptxas checks every kernel for (A100, H100).
const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// NVRTC options, minus the include paths. IEEE math on purpose: no `--use_fast_math`, so the
/// GPU agrees with the simulator and the CPU reference. Also the runtime's options for the
/// embedded-source path (exported as `NVRTC_OPTIONS`).
const NVRTC_OPTIONS: [&str; 3] = ["--gpu-architecture=compute_80", "--std=c++17", "-lineinfo"];

/// Written by `scripts/test.sh` into the tool folder once the pinned wheels are installed.
const TOOLS_STAMP: &str = ".lorafuse-stamp";

/// `true` when the environment variable is `1`.
pub fn env_flag(name: &str) -> bool {
    env::var(name).is_ok_and(|v| v == "1")
}

/// Builds the PTX and writes `$OUT_DIR/kernels_build.rs` (and `ptxas_report.txt` when ptxas ran).
/// An `Err` is a message for the build's failure.
pub fn run(manifest_dir: &Path, kernels_dir: &Path, out_dir: &Path) -> Result<(), String> {
    for var in [
        "LORAFUSE_CUDA_TOOLS",
        "CUDA_HOME",
        "CUDA_PATH",
        "LORAFUSE_REQUIRE_PTX",
        "LORAFUSE_PTXAS_REPORT",
        // Not PATH (searched for ptxas last): editors and shells differ in it, and watching it
        // would re-run the whole build script whenever they alternate.
        "LD_LIBRARY_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // The directory catches added files; each file is listed too for clarity of the fingerprint.
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    let sources = files_with_ext(kernels_dir, &["cu"])?;
    let headers = files_with_ext(kernels_dir, &["h", "cuh"])?;
    for file in sources.iter().chain(&headers) {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let tools = Tools::find(manifest_dir);
    if tools.stamp.exists() {
        // Installing or re-pinning the wheels re-runs the build. (A missing stamp is not
        // watched: cargo would then re-run the script on every build. Installing the tools
        // first time is seen through LORAFUSE_CUDA_TOOLS, which scripts/test.sh sets.)
        println!("cargo:rerun-if-changed={}", tools.stamp.display());
    }

    let compiled = match &tools.nvrtc {
        Some(nvrtc_path) => Some(compile_all(&tools, nvrtc_path, &sources, kernels_dir, out_dir)?),
        None if env_flag("LORAFUSE_REQUIRE_PTX") => {
            return Err(format!(
                "LORAFUSE_REQUIRE_PTX=1 but no NVRTC library was found (searched: {}). \
                 Run scripts/test.sh, which installs the pinned CUDA wheels into .tools/cuda.",
                tools.searched.join(", ")
            ))
        }
        None => None,
    };

    let modules = sources
        .iter()
        .map(|src| {
            let text = read(src)?;
            let file = file_name(src);
            let (ptx, kernels) = match compiled.as_ref().and_then(|c| c.modules.get(&file)) {
                Some(m) => (Some(m.ptx_path.clone()), m.kernels.clone()),
                None => (None, kernel_names::from_source(&text)),
            };
            Ok(ModuleOut { file, src: src.clone(), ptx, kernels })
        })
        .collect::<Result<Vec<_>, String>>()?;

    let detail = match &compiled {
        Some(c) => c.detail.clone(),
        None => format!(
            "no NVRTC at build time (searched: {}); the CUDA sources are embedded and compiled \
             with NVRTC at first use",
            tools.searched.join(", ")
        ),
    };
    let path = if compiled.is_some() { "nvrtc" } else { "embedded-source" };
    let resources = compiled.as_ref().map_or(&[][..], |c| &c.resources);
    write(&out_dir.join("kernels_build.rs"), &kernels_build_rs(path, &detail, &modules, &headers, resources))
}

/// Where the CUDA tools were found (each independently, first hit in search order).
struct Tools {
    nvrtc: Option<PathBuf>,
    ptxas: Option<PathBuf>,
    include: Option<PathBuf>,
    stamp: PathBuf,
    /// The places looked at, for error messages and `BUILD_DETAIL`.
    searched: Vec<String>,
}

impl Tools {
    fn find(manifest_dir: &Path) -> Tools {
        let pip_root =
            env::var_os("LORAFUSE_CUDA_TOOLS").map(PathBuf::from).unwrap_or_else(|| manifest_dir.join(".tools/cuda"));
        let mut roots = vec![Root::pip(&pip_root)];
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(dir) = env::var_os(var) {
                roots.push(Root::toolkit(format!("${var}"), Path::new(&dir)));
            }
        }
        roots.push(Root::toolkit("/usr/local/cuda".into(), Path::new("/usr/local/cuda")));
        for var in ["LD_LIBRARY_PATH", "PATH"] {
            for dir in env::var_os(var).iter().flat_map(env::split_paths) {
                roots.push(Root::beside(format!("${var}"), &dir));
            }
        }
        let mut tools =
            Tools { nvrtc: None, ptxas: None, include: None, stamp: pip_root.join(TOOLS_STAMP), searched: Vec::new() };
        for root in roots {
            let first = |paths: Vec<PathBuf>| {
                let found = paths.into_iter().find(|p| p.is_file())?;
                Some(found.canonicalize().unwrap_or(found))
            };
            tools.nvrtc = tools.nvrtc.or_else(|| first(root.libs));
            tools.ptxas = tools.ptxas.or_else(|| first(root.ptxas));
            tools.include = tools.include.or_else(|| {
                let found = root.includes.into_iter().find(|d| d.join("cuda_bf16.h").is_file())?;
                Some(found.canonicalize().unwrap_or(found))
            });
            if !tools.searched.contains(&root.label) {
                tools.searched.push(root.label);
            }
        }
        if tools.nvrtc.is_none() {
            // Last resort: the dynamic loader's own search (ldconfig cache).
            tools.searched.push("the ldconfig cache".into());
            tools.nvrtc = ["libnvrtc.so.12", "libnvrtc.so"]
                .into_iter()
                .map(PathBuf::from)
                // SAFETY: loading NVRTC runs no initializer with preconditions.
                .find(|name| unsafe { Library::new(name) }.is_ok());
        }
        tools
    }
}

/// One place CUDA tools may live: candidate paths for NVRTC, ptxas and the CUDA headers.
struct Root {
    label: String,
    libs: Vec<PathBuf>,
    ptxas: Vec<PathBuf>,
    includes: Vec<PathBuf>,
}

impl Root {
    /// The pip-wheel layout `scripts/test.sh` installs.
    fn pip(root: &Path) -> Root {
        let nv = root.join("nvidia");
        Root {
            label: root.display().to_string(),
            libs: vec![nv.join("cuda_nvrtc/lib/libnvrtc.so.12")],
            ptxas: vec![nv.join("cuda_nvcc/bin/ptxas")],
            includes: vec![nv.join("cuda_runtime/include")],
        }
    }

    /// A CUDA toolkit installation (`lib64/`, `bin/`, `include/`).
    fn toolkit(label: String, root: &Path) -> Root {
        let libs =
            ["lib64", "lib"].iter().flat_map(|d| ["libnvrtc.so.12", "libnvrtc.so"].map(|f| root.join(d).join(f)));
        Root { label, libs: libs.collect(), ptxas: vec![root.join("bin/ptxas")], includes: vec![root.join("include")] }
    }

    /// A directory of a search path (library or executable): the toolkit or pip layout around it.
    fn beside(label: String, dir: &Path) -> Root {
        let up = dir.join("..");
        Root {
            label,
            libs: vec![dir.join("libnvrtc.so.12"), dir.join("libnvrtc.so")],
            ptxas: vec![dir.join("ptxas"), up.join("bin/ptxas"), up.join("../cuda_nvcc/bin/ptxas")],
            includes: vec![up.join("include"), up.join("../cuda_runtime/include")],
        }
    }
}

/// What NVRTC and ptxas made of the sources.
struct Compiled {
    /// By file name.
    modules: BTreeMap<String, CompiledModule>,
    resources: Vec<Resources>,
    detail: String,
}

struct CompiledModule {
    ptx_path: PathBuf,
    kernels: Vec<String>,
}

fn compile_all(
    tools: &Tools,
    nvrtc_path: &Path,
    sources: &[PathBuf],
    kernels_dir: &Path,
    out_dir: &Path,
) -> Result<Compiled, String> {
    let nvrtc = Nvrtc::load(nvrtc_path)?;
    let ptxas = tools.ptxas.as_deref();
    if ptxas.is_none() {
        let msg = format!(
            "NVRTC found at {} but no ptxas (searched: {}), so no resource report and no spill \
             check (the nvidia-cuda-nvcc-cu12 wheel provides ptxas)",
            nvrtc_path.display(),
            tools.searched.join(", ")
        );
        if env_flag("LORAFUSE_REQUIRE_PTX") {
            return Err(format!("LORAFUSE_REQUIRE_PTX=1: {msg}"));
        }
        println!("cargo:warning={msg}");
    }
    let mut options: Vec<String> = NVRTC_OPTIONS.map(String::from).into();
    options.push(format!("-I{}", kernels_dir.display()));
    if let Some(include) = &tools.include {
        options.push(format!("-I{}", include.display()));
    }

    let ptx_dir = out_dir.join("ptx");
    fs::create_dir_all(&ptx_dir).map_err(|e| format!("cannot create {}: {e}", ptx_dir.display()))?;
    let mut modules = BTreeMap::new();
    let mut resources = Vec::new();
    let mut isa_versions = Vec::new();
    for src in sources {
        let file = file_name(src);
        let source = read(src)?;
        let ptx = nvrtc.compile(&file, &source, &options).map_err(|e| match &tools.include {
            Some(_) => e,
            None => {
                format!("{e}\n(no CUDA headers with cuda_bf16.h were found; searched: {})", tools.searched.join(", "))
            }
        })?;
        // Both readings of the entry points must agree: `lorafuse info` and the launch code
        // use the names whichever path the build took.
        let kernels = kernel_names::from_ptx(&ptx);
        let scanned = kernel_names::from_source(&source);
        if kernels != scanned {
            return Err(format!(
                "{file}: the PTX defines entry points {kernels:?} but the source scan finds \
                 {scanned:?}; write each kernel as `extern \"C\" __global__ void name(...) {{`"
            ));
        }
        if let Some(v) = ptx_isa_version(&ptx) {
            if !isa_versions.contains(&v) {
                isa_versions.push(v);
            }
        }
        let ptx_path = ptx_dir.join(Path::new(&file).with_extension("ptx"));
        write(&ptx_path, &ptx)?;
        if let Some(ptxas) = ptxas {
            for arch in ARCHS {
                resources.extend(run_ptxas(ptxas, &ptx_path, &file, arch)?);
            }
        }
        modules.insert(file, CompiledModule { ptx_path, kernels });
    }

    resources.sort_by(|a, b| (&a.function, &a.arch).cmp(&(&b.function, &b.arch)));
    let report = report_table(&resources);
    write(&out_dir.join("ptxas_report.txt"), &report)?;
    if env_flag("LORAFUSE_PTXAS_REPORT") {
        for line in report.lines() {
            println!("cargo:warning={line}");
        }
    }
    let spills: Vec<String> = resources
        .iter()
        .filter(|r| r.spill_store + r.spill_load > 0)
        .map(|r| {
            format!(
                "{} on {}: {} bytes spill stores, {} bytes spill loads",
                r.function, r.arch, r.spill_store, r.spill_load
            )
        })
        .collect();
    if !spills.is_empty() {
        return Err(format!("register spills (not allowed):\n  {}\n{report}", spills.join("\n  ")));
    }

    let isa = isa_versions.join(", ");
    let driver = isa_versions.iter().map(|v| min_driver(v)).max().flatten();
    let detail = format!(
        "NVRTC {}.{} ({}); {}; CUDA headers: {}; PTX ISA {isa} for compute_80, {}",
        nvrtc.version.0,
        nvrtc.version.1,
        nvrtc_path.display(),
        ptxas_version(ptxas),
        tools.include.as_ref().map_or("not found".into(), |p| p.display().to_string()),
        driver.map_or("minimum driver unknown for this ISA".into(), |d| format!(
            "needs an NVIDIA driver of branch {d} or newer"
        )),
    );
    Ok(Compiled { modules, resources, detail })
}

/// The NVIDIA driver branch that first accepts PTX of ISA `version` ("8.4" → "R550"):
/// PTX ISA 8.x ships with CUDA 12.x (PTX ISA release history), and each CUDA 12.x release
/// names its minimum driver (CUDA toolkit release notes).
pub fn min_driver(version: &str) -> Option<&'static str> {
    Some(match version {
        "8.0" => "R525", // CUDA 12.0
        "8.1" => "R530", // 12.1
        "8.2" => "R535", // 12.2
        "8.3" => "R545", // 12.3
        "8.4" => "R550", // 12.4
        "8.5" => "R555", // 12.5
        "8.6" => "R560", // 12.6 (and 12.7)
        "8.7" => "R570", // 12.8
        "8.8" => "R575", // 12.9
        _ => return None,
    })
}

/// The `.version` directive of a PTX module.
fn ptx_isa_version(ptx: &str) -> Option<String> {
    ptx.lines().find_map(|l| l.trim().strip_prefix(".version")).map(|v| v.trim().to_string())
}

/// One function's resources on one architecture, from `ptxas -v`.
#[derive(Debug, Default, Clone, PartialEq)]
struct Resources {
    function: String,
    arch: String,
    /// A kernel (`.entry`), as opposed to a device function that was not inlined.
    entry: bool,
    registers: u32,
    smem: u32,
    stack: u32,
    spill_store: u32,
    spill_load: u32,
}

fn run_ptxas(ptxas: &Path, ptx: &Path, file: &str, arch: &str) -> Result<Vec<Resources>, String> {
    let cubin = ptx.with_extension(format!("{arch}.cubin"));
    let output = Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg("-o")
        .arg(&cubin)
        .arg(ptx)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("ptxas -arch={arch} failed on the PTX of {file} ({}):\n{text}", ptx.display()));
    }
    Ok(parse_ptxas(&text, arch))
}

/// Parses `ptxas -v` output:
///
/// ```text
/// ptxas info    : Compiling entry function 'gemm' for 'sm_80'
/// ptxas info    : Function properties for gemm
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 40 registers, 8192 bytes smem, 400 bytes cmem[0]
/// ```
///
/// Non-inlined device functions get "Function properties" too; they are kept so that their
/// spills also fail the build.
fn parse_ptxas(text: &str, arch: &str) -> Vec<Resources> {
    let mut out: Vec<Resources> = Vec::new();
    let mut current: Option<usize> = None;
    let quoted = |s: &str| s.split('\'').nth(1).map(str::to_string);
    let record = |out: &mut Vec<Resources>, name: String, entry: bool| match out.iter().position(|r| r.function == name)
    {
        Some(i) => {
            out[i].entry |= entry;
            i
        }
        None => {
            out.push(Resources { function: name, arch: arch.into(), entry, ..Default::default() });
            out.len() - 1
        }
    };
    for line in text.lines() {
        let info = line.split_once("info    :").map_or(line, |(_, rest)| rest).trim();
        if let Some(rest) = info.strip_prefix("Compiling entry function") {
            current = quoted(rest).map(|name| record(&mut out, name, true));
        } else if let Some(name) = info.strip_prefix("Function properties for ") {
            current = Some(record(&mut out, name.trim().to_string(), false));
        } else if let Some(i) = current {
            let r = &mut out[i];
            // Comma-separated "N what" fields; order and extra fields vary across versions.
            for field in info.trim_start_matches("Used ").split(',') {
                let mut words = field.split_whitespace();
                let (Some(n), what) = (words.next().and_then(|n| n.parse().ok()), words.collect::<Vec<_>>().join(" "))
                else {
                    continue;
                };
                match what.as_str() {
                    "registers" => r.registers = n,
                    "bytes smem" => r.smem = n,
                    "bytes stack frame" => r.stack = n,
                    "bytes spill stores" => r.spill_store = n,
                    "bytes spill loads" => r.spill_load = n,
                    _ => {}
                }
            }
        }
    }
    out
}

fn ptxas_version(ptxas: Option<&Path>) -> String {
    let Some(ptxas) = ptxas else {
        return "no ptxas (no resource report)".into();
    };
    let version = Command::new(ptxas).arg("--version").output().ok().and_then(|o| {
        // "Cuda compilation tools, release 12.4, V12.4.131"
        let text = String::from_utf8_lossy(&o.stdout);
        text.lines().find(|l| l.contains("release")).map(|l| l.trim().to_string())
    });
    format!("ptxas: {} ({})", version.as_deref().unwrap_or("version unknown"), ptxas.display())
}

fn report_table(resources: &[Resources]) -> String {
    let mut t = format!(
        "{:<32} {:<6} {:>5} {:>10} {:>10} {:>12} {:>12}\n",
        "kernel", "arch", "regs", "smem (B)", "stack (B)", "spill st (B)", "spill ld (B)"
    );
    for r in resources {
        let name = if r.entry { r.function.clone() } else { format!("{} (device fn)", r.function) };
        let _ = writeln!(
            t,
            "{name:<32} {:<6} {:>5} {:>10} {:>10} {:>12} {:>12}",
            r.arch, r.registers, r.smem, r.stack, r.spill_store, r.spill_load
        );
    }
    t
}

struct ModuleOut {
    file: String,
    src: PathBuf,
    ptx: Option<PathBuf>,
    kernels: Vec<String>,
}

/// The generated Rust: `{:?}` of a `str` is a valid Rust string literal.
fn kernels_build_rs(
    path: &str,
    detail: &str,
    modules: &[ModuleOut],
    headers: &[PathBuf],
    resources: &[Resources],
) -> String {
    let lit = |p: &Path| format!("{:?}", p.display().to_string());
    let mut s = String::from("// Generated by build/ptx.rs: do not edit.\n");
    let _ = writeln!(s, "pub const BUILD_PATH: &str = {path:?};");
    let _ = writeln!(s, "pub const BUILD_DETAIL: &str = {detail:?};");
    let _ = writeln!(s, "/// NVRTC options of the build (the runtime adds its include paths).");
    let _ = writeln!(s, "pub const NVRTC_OPTIONS: &[&str] = &{NVRTC_OPTIONS:?};");
    s += "pub static MODULES: &[KernelModule] = &[\n";
    for m in modules {
        let ptx = m.ptx.as_ref().map_or("None".into(), |p| format!("Some(include_str!({}))", lit(p)));
        let _ = writeln!(
            s,
            "    KernelModule {{ file: {:?}, ptx: {ptx}, source: include_str!({}), kernels: &{:?} }},",
            m.file,
            lit(&m.src),
            m.kernels
        );
    }
    s += "];\npub static HEADERS: &[(&str, &str)] = &[\n";
    for h in headers {
        let _ = writeln!(s, "    ({:?}, include_str!({})),", file_name(h), lit(h));
    }
    s += "];\npub static RESOURCES: &[KernelResources] = &[\n";
    for r in resources.iter().filter(|r| r.entry) {
        let _ = writeln!(
            s,
            "    KernelResources {{ kernel: {:?}, arch: {:?}, registers: {}, shared_bytes: {}, \
             spill_store_bytes: {}, spill_load_bytes: {}, stack_bytes: {} }},",
            r.function, r.arch, r.registers, r.smem, r.spill_store, r.spill_load, r.stack
        );
    }
    s + "];\n"
}

/// NVRTC's C API, loaded at build time (`nvrtc.h`).
struct Nvrtc {
    version: (c_int, c_int),
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> c_int,
    log: unsafe extern "C" fn(Program, *mut c_char) -> c_int,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> c_int,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> c_int,
    destroy: unsafe extern "C" fn(*mut Program) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    /// Keeps the function pointers above valid.
    _lib: Library,
}

type Program = *mut c_void;

impl Nvrtc {
    fn load(path: &Path) -> Result<Nvrtc, String> {
        let fail = |e: libloading::Error| format!("cannot load NVRTC from {}: {e}", path.display());
        // SAFETY: libnvrtc's initializers have no preconditions; each symbol is read with the
        // signature `nvrtc.h` gives it.
        unsafe {
            let lib = Library::new(path).map_err(fail)?;
            let version_fn =
                *lib.get::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int>(b"nvrtcVersion\0").map_err(fail)?;
            let mut version = (0, 0);
            version_fn(&mut version.0, &mut version.1);
            Ok(Nvrtc {
                version,
                create: *lib.get(b"nvrtcCreateProgram\0").map_err(fail)?,
                compile: *lib.get(b"nvrtcCompileProgram\0").map_err(fail)?,
                log_size: *lib.get(b"nvrtcGetProgramLogSize\0").map_err(fail)?,
                log: *lib.get(b"nvrtcGetProgramLog\0").map_err(fail)?,
                ptx_size: *lib.get(b"nvrtcGetPTXSize\0").map_err(fail)?,
                ptx: *lib.get(b"nvrtcGetPTX\0").map_err(fail)?,
                destroy: *lib.get(b"nvrtcDestroyProgram\0").map_err(fail)?,
                error_string: *lib.get(b"nvrtcGetErrorString\0").map_err(fail)?,
                _lib: lib,
            })
        }
    }

    /// Compiles one source to PTX; the error carries NVRTC's log.
    fn compile(&self, name: &str, source: &str, options: &[String]) -> Result<String, String> {
        let cstr = |s: &str| CString::new(s).map_err(|_| format!("{name}: NUL byte in source or option"));
        let (c_src, c_name) = (cstr(source)?, cstr(name)?);
        let c_opts = options.iter().map(|o| cstr(o)).collect::<Result<Vec<_>, _>>()?;
        let opt_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
        let check = |what: &str, code: c_int| -> Result<(), String> {
            if code == 0 {
                return Ok(());
            }
            // SAFETY: NVRTC returns a static NUL-terminated string for any result code.
            let msg = unsafe { CStr::from_ptr((self.error_string)(code)) }.to_string_lossy();
            Err(format!("NVRTC {what} failed on kernels/{name}: {msg}"))
        };
        // SAFETY: every pointer passed lives across the calls; buffers are sized by NVRTC.
        unsafe {
            let mut prog: Program = ptr::null_mut();
            check(
                "nvrtcCreateProgram",
                (self.create)(&mut prog, c_src.as_ptr(), c_name.as_ptr(), 0, ptr::null(), ptr::null()),
            )?;
            let result = (|| {
                let compiled = (self.compile)(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr());
                if compiled != 0 {
                    let log = self.read(prog, self.log_size, self.log)?;
                    check("compilation", compiled)
                        .map_err(|e| format!("{e}\noptions: {}\n{}", options.join(" "), log.trim_end_matches('\0')))?;
                }
                self.read(prog, self.ptx_size, self.ptx)
            })();
            (self.destroy)(&mut prog);
            result
        }
    }

    /// Reads the log or the PTX of `prog` (size query, then copy).
    unsafe fn read(
        &self,
        prog: Program,
        size: unsafe extern "C" fn(Program, *mut usize) -> c_int,
        get: unsafe extern "C" fn(Program, *mut c_char) -> c_int,
    ) -> Result<String, String> {
        let mut n = 0usize;
        let mut buf: Vec<u8>;
        // SAFETY: the caller's `prog` is valid; `buf` has the size NVRTC asked for.
        unsafe {
            if size(prog, &mut n) != 0 {
                return Err("NVRTC: cannot read the program's output size".into());
            }
            buf = vec![0; n];
            if get(prog, buf.as_mut_ptr().cast()) != 0 {
                return Err("NVRTC: cannot read the program's output".into());
            }
        }
        let text = String::from_utf8_lossy(&buf);
        Ok(text.trim_end_matches('\0').to_string())
    }
}

fn files_with_ext(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| exts.iter().any(|e| x == *e)))
        .collect();
    files.sort();
    Ok(files)
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

pub fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
