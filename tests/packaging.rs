//! Packaging: the Helm chart through the real Helm engine, the pod's and the
//! systemd unit's life run for real, the Dockerfile against the Makefile,
//! and `make install`. The chart and pod checks are Python scripts in
//! tests/packaging/ (Helm comes as a library from PyPI, installed into a
//! virtualenv under target/ by tests/packaging/helm-venv.sh on first use);
//! each test here runs one of their cases.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn xlb_bin() -> &'static str {
    env!("CARGO_BIN_EXE_xlb")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}{}", text(&out.stdout), text(&out.stderr));
    out
}

/// The virtualenv's python, made once per test binary (and once per target
/// directory: helm-venv.sh keeps it and locks against concurrent runs).
fn helm_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm-venv");
        let out = run(Command::new(repo().join("tests/packaging/helm-venv.sh")).arg(&venv));
        eprint!("{}", text(&out.stderr));
        PathBuf::from(text(&out.stdout).trim())
    })
}

/// Runs `tests/packaging/SCRIPT CASE` with the Helm virtualenv's python.
fn py_case(script: &str, case: &str) {
    let out = Command::new(helm_python())
        .arg(repo().join("tests/packaging").join(script))
        .arg(case)
        .env("XLB_BIN", xlb_bin())
        .env("XLB_TEST_TMPDIR", env!("CARGO_TARGET_TMPDIR"))
        .env("PYTHONDONTWRITEBYTECODE", "1") // no __pycache__ in the source tree
        .output()
        .expect("python runs");
    print!("{}", text(&out.stdout));
    assert!(out.status.success(), "{script} {case} failed:\n{}{}", text(&out.stdout), text(&out.stderr));
}

// -- the Helm chart (tests/packaging/test_chart.py) --------------------------

#[test]
fn chart_with_default_values_asks_for_the_backend_service() {
    py_case("test_chart.py", "lint_default_values");
}

#[test]
fn chart_lints_and_renders_the_guides_quick_start() {
    py_case("test_chart.py", "lint_quick_start");
}

#[test]
fn chart_lints_and_renders_the_guides_complete_example() {
    py_case("test_chart.py", "lint_complete_example");
}

#[test]
fn chart_renders_every_values_snippet_of_the_guide() {
    py_case("test_chart.py", "guide_snippets_render");
}

#[test]
fn chart_values_list_every_key_the_guide_uses() {
    py_case("test_chart.py", "values_list_every_key_the_guide_uses");
}

#[test]
fn chart_pod_spec_keeps_the_guides_promises() {
    py_case("test_chart.py", "pod_spec");
}

#[test]
fn chart_rbac_is_least_privilege() {
    py_case("test_chart.py", "rbac_least_privilege");
}

#[test]
fn chart_refuses_a_grace_period_not_above_shutdown_timeout() {
    py_case("test_chart.py", "refuses_short_grace_period");
}

#[test]
fn chart_schema_refuses_what_xlb_would_refuse() {
    py_case("test_chart.py", "refuses_bad_values");
}

#[test]
fn chart_schema_config_keys_match_xlbs() {
    py_case("test_chart.py", "config_keys_match_xlb");
}

#[test]
fn chart_rendered_config_passes_xlb_check() {
    py_case("test_chart.py", "rendered_config_passes_xlb_check");
}

#[test]
fn chart_admin_auth_password_comes_from_a_secret() {
    py_case("test_chart.py", "admin_auth_password_from_secret");
}

#[test]
fn chart_upgrade_with_set_env_keeps_the_provider() {
    py_case("test_chart.py", "upgrade_set_env_keeps_provider");
}

#[test]
fn chart_notes_and_readme_explain_troubleshooting_and_services() {
    py_case("test_chart.py", "notes_and_readme");
}

#[test]
fn chart_mounts_only_the_instances_pin_directory() {
    py_case("test_chart.py", "pin_directory_only");
}

#[test]
fn chart_sets_a_seccomp_profile_equal_to_the_units_filter() {
    py_case("test_chart.py", "seccomp_profile");
}

#[test]
fn chart_privileged_is_an_opt_in_fallback() {
    py_case("test_chart.py", "privileged_fallback");
}

// -- xlb as the pod and the unit run it (tests/packaging/test_pod.py) --------

#[test]
fn pod_lifecycle_with_read_only_proc_sys_pin_directory_and_three_capabilities() {
    py_case("test_pod.py", "lifecycle");
}

#[test]
fn pod_prepare_node_picks_xlbs_interfaces() {
    py_case("test_pod.py", "interface_choice");
}

#[test]
fn systemd_unit_runs_xlb_with_only_its_capabilities_and_syscall_filter() {
    py_case("test_pod.py", "systemd_unit");
}

// -- Dockerfile ----------------------------------------------------------------

/// The Dockerfile's stages: (FROM line, RUN commands split at `&&`, other
/// instructions), with line continuations joined and RUN flags dropped.
fn dockerfile_stages() -> Vec<(String, Vec<String>, Vec<String>)> {
    let source = fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let mut lines = Vec::new();
    let mut cur = String::new();
    for line in source.lines() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                lines.push(std::mem::take(&mut cur));
            }
        }
    }
    let mut stages: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    let mut args: Vec<(String, String)> = Vec::new(); // global ARGs, for FROM lines
    for line in lines {
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        match word.to_ascii_uppercase().as_str() {
            "ARG" if stages.is_empty() => {
                let (k, v) = rest.trim().split_once('=').unwrap_or((rest.trim(), ""));
                args.push((k.to_string(), v.to_string()));
            }
            "FROM" => {
                let mut from = rest.trim().to_string();
                for (k, v) in &args {
                    from = from.replace(&format!("${{{k}}}"), v);
                }
                stages.push((from, Vec::new(), Vec::new()))
            }
            "RUN" => {
                let stage = stages.last_mut().expect("RUN before FROM");
                let cmd: Vec<&str> = rest.split_whitespace().skip_while(|w| w.starts_with("--")).collect();
                for part in cmd.join(" ").split("&&") {
                    stage.1.push(part.split_whitespace().collect::<Vec<_>>().join(" "));
                }
            }
            _ => {
                if let Some(stage) = stages.last_mut() {
                    stage.2.push(line.clone());
                }
            }
        }
    }
    stages
}

#[test]
fn dockerfile_builds_with_the_commands_make_build_runs() {
    // What `make build` runs, from make itself (CARGO as the Makefile's default).
    let out = run(Command::new("make")
        .args(["-n", "-s", "--no-print-directory", "build", "CARGO=cargo"])
        .current_dir(repo())
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL"));
    let make: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty() && !l.starts_with("echo "))
        .collect();
    assert!(make.iter().any(|c| c.starts_with("cargo build")), "make -n build printed {make:?}");

    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "the Dockerfile must be multi-stage");
    let (from, runs, _) = &stages[0];
    assert!(from.contains("bookworm") && from.contains(" AS build"), "build stage: FROM {from}");
    // Every command of `make build`, in the same order, among the build stage's RUNs.
    let mut rest = runs.iter();
    for cmd in &make {
        assert!(
            rest.any(|r| r == cmd),
            "the Dockerfile's build stage does not run `{cmd}` (in make's order); make build runs {make:?}, the Dockerfile {runs:?}"
        );
    }
    let (from, _, other) = stages.last().unwrap();
    assert!(from.starts_with("debian:") && from.contains("-slim"), "runtime stage: FROM {from}");
    assert!(other.iter().any(|l| l.starts_with("COPY --from=build /src/target/release/xlb ")));
    assert!(other.contains(&r#"ENTRYPOINT ["/usr/local/bin/xlb"]"#.to_string()), "{other:?}");
    // The chart's container args and the image's default command agree.
    assert!(other.contains(&r#"CMD ["run", "--config", "/etc/xlb/xlb.yaml"]"#.to_string()), "{other:?}");
    let deployment = fs::read_to_string(repo().join("helm/xlb/templates/deployment.yaml")).unwrap();
    assert!(deployment.contains(r#"args: ["run", "--config", "/etc/xlb/xlb.yaml"]"#));
}

/// Packages the runtime stage installs with apt-get.
fn runtime_packages() -> BTreeSet<String> {
    let stages = dockerfile_stages();
    let (_, runs, _) = stages.last().unwrap();
    runs.iter()
        .filter_map(|r| r.strip_prefix("apt-get install "))
        .flat_map(|r| r.split_whitespace().filter(|w| !w.starts_with('-')).map(String::from))
        .collect()
}

#[test]
fn dockerfile_runtime_has_every_library_xlb_links() {
    let packages = runtime_packages();
    // In every Debian image: the C library and libgcc (libc6 depends on it).
    let base = ["libc6", "libgcc-s1"];
    let ldd = run(Command::new("ldd").arg(xlb_bin()));
    let mut linked = BTreeSet::new();
    for line in text(&ldd.stdout).lines() {
        let Some((_, path)) = line.split_once("=> ") else { continue };
        let Some(path) = path.split_whitespace().next() else { continue };
        let real = fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
        let owner =
            [PathBuf::from(path), real.clone(), Path::new("/usr").join(real.strip_prefix("/").unwrap())]
                .iter()
                .find_map(|p| {
                    let out = Command::new("dpkg").arg("-S").arg(p).output().ok()?;
                    out.status.success().then(|| text(&out.stdout))
                })
                .unwrap_or_else(|| panic!("no Debian package owns {path}"));
        let pkg = owner.split(':').next().unwrap().trim().to_string();
        linked.insert(pkg);
    }
    assert!(linked.contains("libelf1"), "expected xlb to link libelf: {linked:?}");
    for pkg in &linked {
        assert!(
            packages.contains(pkg) || base.contains(&pkg.as_str()),
            "xlb links a library from {pkg}, which the Dockerfile's runtime stage does not install ({packages:?})"
        );
    }
    // The guide's `ip link show | grep xdp` and the chart's probe and init script.
    for tool in ["iproute2", "curl"] {
        assert!(packages.contains(tool), "the runtime image needs {tool}");
    }
}

#[test]
fn dockerfile_rust_is_at_least_the_crates_rust_version() {
    let source = fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let docker = source.lines().find_map(|l| l.strip_prefix("ARG RUST_VERSION=")).expect("ARG RUST_VERSION");
    let manifest = fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let crate_min = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version")
        .trim_matches('"');
    let parse = |v: &str| -> (u32, u32) {
        let mut it = v.split('.').map(|n| n.parse::<u32>().expect("version number"));
        (it.next().unwrap(), it.next().unwrap_or(0))
    };
    assert!(parse(docker) >= parse(crate_min), "Dockerfile Rust {docker} < rust-version {crate_min}");
}

/// Whether a .dockerignore pattern (Go filepath.Match per path segment, `**`
/// for any number of segments) excludes `path` or a directory above it.
fn dockerignored(pattern: &str, path: &str) -> bool {
    fn segment(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => segment(&p[1..], s) || (!s.is_empty() && segment(p, &s[1..])),
            (Some(b'?'), Some(_)) => segment(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => segment(&p[1..], &s[1..]),
            _ => false,
        }
    }
    fn prefix(p: &[&str], s: &[&str]) -> bool {
        match p.first() {
            None => true, // the pattern matched a directory above, or the path itself
            Some(&"**") => (0..=s.len()).any(|i| prefix(&p[1..], &s[i..])),
            Some(seg) => {
                !s.is_empty() && segment(seg.as_bytes(), s[0].as_bytes()) && prefix(&p[1..], &s[1..])
            }
        }
    }
    let p: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    let s: Vec<&str> = path.split('/').collect();
    prefix(&p, &s)
}

#[test]
fn dockerignore_keeps_build_inputs_and_drops_build_output() {
    let source = fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    let patterns: Vec<&str> =
        source.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert!(!patterns.iter().any(|p| p.starts_with('!')), "negations are not modelled here");
    let ignored = |path: &str| patterns.iter().any(|p| dockerignored(p, path));
    for out in ["target/release/xlb", ".git/HEAD", "src/bpf/xlb.bpf.o"] {
        assert!(ignored(out), "{out} should stay out of the build context");
    }
    let inputs = [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "src/main.rs",
        "src/bpf/xlb.bpf.c",
        "scripts/setup.sh",
        "config/xlb.yaml",
    ];
    for input in inputs {
        assert!(repo().join(input).exists(), "{input} moved: update this test");
        assert!(!ignored(input), ".dockerignore drops {input}, which the build needs");
    }
    // The matcher itself, both ways.
    assert!(
        dockerignored("**/*.o", "a/b/c.o")
            && dockerignored("**/*.o", "c.o")
            && dockerignored("target", "target/x")
    );
    assert!(
        !dockerignored("target", "targets")
            && !dockerignored("**/*.o", "a/b.c")
            && !dockerignored("helm", "src/helm.rs")
    );
}

// -- systemd unit and make install ---------------------------------------------

/// config/xlb.service's [Service] settings, key -> values in order.
fn unit() -> Vec<(String, String)> {
    let source = fs::read_to_string(repo().join("config/xlb.service")).expect("config/xlb.service");
    let mut section = "";
    let mut out = Vec::new();
    for line in source.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            section = if line == "[Service]" { "service" } else { "" };
        } else if section == "service" {
            let (k, v) = line.split_once('=').expect("key=value");
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

fn unit_value(key: &str) -> Vec<String> {
    unit().into_iter().filter(|(k, _)| k == key).map(|(_, v)| v).collect()
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    // verify wants ExecStart's binary to exist: point it at the one cargo built.
    let dir = tempfile::tempdir().unwrap();
    let unit = fs::read_to_string(repo().join("config/xlb.service")).unwrap();
    let path = dir.path().join("xlb.service");
    fs::write(&path, unit.replace("/usr/local/bin/xlb", xlb_bin())).unwrap();
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    // verify exits 0 on unknown keys and unparsable values; it only warns.
    let warnings: Vec<String> = text(&out.stderr).lines().map(String::from).collect();
    assert!(warnings.is_empty(), "systemd-analyze verify warns: {warnings:#?}");
    // And the check catches a broken unit.
    fs::write(
        &path,
        unit.replace("/usr/local/bin/xlb", xlb_bin()).replace("TimeoutStopSec=", "TimeoutStopSecs="),
    )
    .unwrap();
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert!(text(&out.stderr).contains("TimeoutStopSecs"), "verify did not notice an unknown key");
}

#[test]
fn systemd_unit_settings() {
    let one = |key: &str| -> String {
        let v = unit_value(key);
        assert_eq!(v.len(), 1, "{key}: {v:?}");
        v[0].clone()
    };
    assert!(["exec", "notify", "simple"].contains(&one("Type").as_str()));
    assert!(unit_value("ExecReload").iter().any(|c| c == "/bin/kill -HUP $MAINPID"));
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("Restart"), "on-failure");
    // TimeoutStopSec above the shutdown_timeout `make install` puts in place.
    let check = run(Command::new(xlb_bin()).args(["check", "-c"]).arg(repo().join("config/xlb.yaml")));
    let effective: serde_norway::Value = serde_norway::from_slice(&check.stdout).unwrap();
    let shutdown = effective["shutdown_timeout"].as_u64().unwrap();
    let stop: u64 = one("TimeoutStopSec").parse().unwrap();
    assert!(
        stop > shutdown,
        "TimeoutStopSec={stop} must exceed config/xlb.yaml's shutdown_timeout {shutdown}"
    );
    // uid 0 confers nothing (SecureBits); exactly the chart's capabilities.
    let bits: BTreeSet<String> = one("SecureBits").split_whitespace().map(String::from).collect();
    assert!(bits.contains("noroot") && bits.contains("noroot-locked"), "SecureBits={bits:?}");
    let values: serde_norway::Value =
        serde_norway::from_str(&fs::read_to_string(repo().join("helm/xlb/values.yaml")).unwrap()).unwrap();
    let chart: BTreeSet<String> = values["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| format!("CAP_{}", c.as_str().unwrap()))
        .collect();
    for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
        let caps: BTreeSet<String> = one(key).split_whitespace().map(String::from).collect();
        assert_eq!(caps, chart, "{key} differs from the chart's capabilities");
    }
    for (key, value) in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes")] {
        assert_eq!(one(key), value);
    }
    assert!(unit_value("ProtectKernelTunables").is_empty(), "xlb writes /proc/sys/net/ipv4/conf");
    // systemd's own measure of the sandbox: "OK" or better (<= 3.9 is "OK").
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("xlb.service");
    fs::copy(repo().join("config/xlb.service"), &path).unwrap();
    let out =
        run(Command::new("systemd-analyze").args(["security", "--offline=true", "--no-pager"]).arg(&path));
    let report = text(&out.stdout);
    let level: f64 = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for xlb.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(level <= 3.0, "systemd-analyze security rates the unit {level} (want <= 3.0)");
}

#[test]
fn make_install_puts_binary_unit_and_config_in_place() {
    let dest = tempfile::tempdir().unwrap();
    let install = |extra: &[&str]| {
        run(Command::new("make")
            .args(["-s", "--no-print-directory", "-o", "build", "install", "CARGO=cargo"])
            .arg(format!("DESTDIR={}", dest.path().display()))
            .arg(format!("XLB_BIN={}", xlb_bin()))
            .args(extra)
            .current_dir(repo())
            .env_remove("MAKEFLAGS")
            .env_remove("MFLAGS")
            .env_remove("MAKELEVEL"))
    };
    install(&[]);
    let root = dest.path();
    let mode = |p: &str| {
        fs::metadata(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}")).permissions().mode() & 0o777
    };
    assert_eq!(mode("usr/local/bin/xlb"), 0o755);
    assert_eq!(fs::read(root.join("usr/local/bin/xlb")).unwrap(), fs::read(xlb_bin()).unwrap());
    assert_eq!(mode("etc/systemd/system/xlb.service"), 0o644);
    assert_eq!(
        fs::read_to_string(root.join("etc/systemd/system/xlb.service")).unwrap(),
        fs::read_to_string(repo().join("config/xlb.service")).unwrap()
    );
    assert_eq!(mode("etc/xlb/xlb.yaml"), 0o640);
    assert_eq!(
        fs::read(root.join("etc/xlb/xlb.yaml")).unwrap(),
        fs::read(repo().join("config/xlb.yaml")).unwrap()
    );
    // A second install keeps the operator's config.
    fs::write(root.join("etc/xlb/xlb.yaml"), "# mine\n").unwrap();
    install(&["PREFIX=/opt/xlb"]);
    assert_eq!(fs::read_to_string(root.join("etc/xlb/xlb.yaml")).unwrap(), "# mine\n");
    let unit = fs::read_to_string(root.join("etc/systemd/system/xlb.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/opt/xlb/bin/xlb run ") && !unit.contains("/usr/local/bin/xlb"),
        "{unit}"
    );
    assert_eq!(mode("opt/xlb/bin/xlb"), 0o755);
}
