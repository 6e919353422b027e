//! Metrics and health over HTTP, off by default (`[metrics] listen`).
//!
//! - `GET /metrics`: the OpenMetrics text format (which Prometheus scrapes
//!   natively), from `prometheus-client`: requests by socket, operation and
//!   result, latency histograms, the audit writer's queue and commit
//!   latency, the seal state, keys and versions, the tablespaces' key files
//!   (how far behind the primary master key version, for how long), and
//!   the re-keys the mounts report.
//! - `GET /health`: `200` when initialized, unsealed and the audit log
//!   writes; `503` when sealed, zeroized or the audit log is failing, with
//!   a JSON body saying which (like Vault's `/v1/sys/health`).
//!   `?sealedcode=N` answers `N` instead of `503` while sealed (a liveness
//!   probe that must not restart a sealed sidecar), as Vault's does.
//!
//! Served by axum on hyper; with `tls_cert` and `tls_key`, over rustls.
//! Neither endpoint shows key material or takes input beyond the path and
//! that one query parameter; both read state the daemon already has
//! (the registry read is one SQLite query per scrape).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tde_protocol::{Op, Response as Answer};

use crate::audit::AuditStats;
use crate::config::MetricsConfig;
use crate::handler::{Service, SocketKind};

/// Tablespaces (registrations) and re-keys shown at most, so that a
/// registry of a hostile size cannot make a scrape of a hostile size.
pub const MAX_SERIES: usize = 1000;

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    socket: &'static str,
    op: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    socket: &'static str,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    key: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlaceLabels {
    key: String,
    location: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RekeyStateLabels {
    key: String,
    location: String,
    state: String,
}

/// The last re-key report of one tablespace.
#[derive(Debug, Clone)]
struct RekeyReport {
    key: String,
    state: String,
    done: u64,
    total: u64,
}

#[derive(Debug)]
struct Tls {
    config: axum_server::tls_rustls::RustlsConfig,
    cert: PathBuf,
    key: PathBuf,
}

type Latency = Family<OpLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 20 µs .. ~5 s.
    Histogram::new(exponential_buckets(0.00002, 2.0, 18))
}

/// Every metric of the daemon. Counters move as requests are answered;
/// the state gauges are refreshed at each scrape.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Latency,
    audit: Arc<AuditStats>,
    audit_failing: Gauge,
    initialized: Gauge,
    sealed: Gauge,
    zeroized: Gauge,
    unseal_progress: Gauge,
    unseal_threshold: Gauge,
    keys: Gauge,
    key_primary: Family<KeyLabels, Gauge>,
    key_primary_age: Family<KeyLabels, Gauge>,
    key_versions: Family<VersionLabels, Gauge>,
    keyfile_behind: Family<PlaceLabels, Gauge>,
    keyfile_lag: Family<PlaceLabels, Gauge>,
    keyfile_seen_age: Family<PlaceLabels, Gauge>,
    rekey_done: Family<PlaceLabels, Gauge>,
    rekey_total: Family<PlaceLabels, Gauge>,
    rekey_state: Family<RekeyStateLabels, Gauge>,
    rekeys: Mutex<BTreeMap<String, RekeyReport>>,
    /// The listener's TLS configuration and its files, read again by a
    /// reload.
    tls: OnceLock<Tls>,
    /// One scrape refreshes and encodes at a time.
    scrape: Mutex<()>,
}

impl Metrics {
    /// A registry with every metric, sharing the audit writer's counters.
    pub fn new(audit: Arc<AuditStats>) -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("tde"),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            audit,
            audit_failing: Gauge::default(),
            initialized: Gauge::default(),
            sealed: Gauge::default(),
            zeroized: Gauge::default(),
            unseal_progress: Gauge::default(),
            unseal_threshold: Gauge::default(),
            keys: Gauge::default(),
            key_primary: Family::default(),
            key_primary_age: Family::default(),
            key_versions: Family::default(),
            keyfile_behind: Family::default(),
            keyfile_lag: Family::default(),
            keyfile_seen_age: Family::default(),
            rekey_done: Family::default(),
            rekey_total: Family::default(),
            rekey_state: Family::default(),
            rekeys: Mutex::new(BTreeMap::new()),
            tls: OnceLock::new(),
            scrape: Mutex::new(()),
        };
        let r = &mut m.registry;
        r.register(
            "build",
            "The tde version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        r.register(
            "requests",
            "Requests answered, by socket, operation and result (ok or the error code)",
            m.requests.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time from a request's frame to its answer (a watch_key long poll included)",
            Unit::Seconds,
            m.latency.clone(),
        );
        r.register(
            "audit_queue_depth",
            "Audit records waiting for the writer",
            m.audit.queued.clone(),
        );
        r.register(
            "audit_records_committed",
            "Audit records made durable",
            m.audit.committed.clone(),
        );
        r.register(
            "audit_commit_failures",
            "Audit commits that failed (every operation in them was refused)",
            m.audit.failed_commits.clone(),
        );
        r.register_with_unit(
            "audit_commit_duration",
            "Time of one group commit (a transaction and its fsync)",
            Unit::Seconds,
            m.audit.commit_seconds.clone(),
        );
        r.register(
            "audit_failing",
            "1 while the last audit commit failed (operations are refused)",
            m.audit_failing.clone(),
        );
        r.register(
            "initialized",
            "1 when the key store is initialized",
            m.initialized.clone(),
        );
        r.register("sealed", "1 while the HSM is sealed", m.sealed.clone());
        r.register(
            "zeroized",
            "1 once the HSM was zeroized",
            m.zeroized.clone(),
        );
        r.register(
            "unseal_progress",
            "Unseal shares given so far",
            m.unseal_progress.clone(),
        );
        r.register(
            "unseal_threshold",
            "Unseal shares needed",
            m.unseal_threshold.clone(),
        );
        r.register("keys", "Master keys (0 while sealed)", m.keys.clone());
        r.register(
            "key_primary_version",
            "A master key's primary version",
            m.key_primary.clone(),
        );
        r.register_with_unit(
            "key_primary_age",
            "Time since a master key's primary version was made",
            Unit::Seconds,
            m.key_primary_age.clone(),
        );
        r.register(
            "key_versions",
            "A master key's versions by state",
            m.key_versions.clone(),
        );
        r.register(
            "keyfile_versions_behind",
            "How many master key versions a tablespace's key file is behind the primary (0: current)",
            m.keyfile_behind.clone(),
        );
        r.register_with_unit(
            "keyfile_rewrap_lag",
            "Time since the primary version a key file is behind was made (0: current)",
            Unit::Seconds,
            m.keyfile_lag.clone(),
        );
        r.register_with_unit(
            "keyfile_last_seen_age",
            "Time since the mount of a tablespace last registered its key file",
            Unit::Seconds,
            m.keyfile_seen_age.clone(),
        );
        r.register(
            "rekey_blocks_done",
            "Blocks a tablespace's re-key has looked at in its current pass",
            m.rekey_done.clone(),
        );
        r.register(
            "rekey_blocks_total",
            "Blocks in the tablespace at the start of the re-key's pass",
            m.rekey_total.clone(),
        );
        r.register(
            "rekey_state",
            "The state of a tablespace's last reported re-key (started, progress, finished, failed)",
            m.rekey_state.clone(),
        );
        m
    }

    /// Reads the TLS certificate and key again (`None`: no TLS). Called
    /// from a blocking thread of the runtime (a reload).
    pub fn reload_tls(&self) -> Option<Result<(), String>> {
        let t = self.tls.get()?;
        let rt = tokio::runtime::Handle::try_current().ok()?;
        Some(
            rt.block_on(t.config.reload_from_pem_file(&t.cert, &t.key))
                .map_err(|e| format!("{} and {}: {e}", t.cert.display(), t.key.display())),
        )
    }

    /// Counts one answered request.
    pub fn answered(&self, kind: SocketKind, op: u16, resp: &Answer, took: Duration) {
        let socket = kind.name();
        let op = Op::from_u16(op).map_or("unknown", Op::name);
        let result = match resp {
            Answer::Error { code, .. } => code.name(),
            _ => "ok",
        };
        self.requests
            .get_or_create(&RequestLabels { socket, op, result })
            .inc();
        self.latency
            .get_or_create(&OpLabels { socket, op })
            .observe(took.as_secs_f64());
    }

    /// Keeps a mount's re-key report (the newest per location).
    pub fn rekey_reported(&self, key: &str, location: &str, state: &str, done: u64, total: u64) {
        let mut m = self.rekeys.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_SERIES && !m.contains_key(location) {
            return;
        }
        m.insert(
            location.to_string(),
            RekeyReport {
                key: key.to_string(),
                state: state.to_string(),
                done,
                total,
            },
        );
    }

    /// Refreshes the state gauges from `svc` and encodes everything.
    pub fn render(&self, svc: &Service) -> Result<String, String> {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(svc);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|e| format!("encoding the metrics: {e}"))?;
        Ok(out)
    }

    fn refresh(&self, svc: &Service) {
        let st = svc.hsm.status();
        let b = |v: bool| i64::from(v);
        self.initialized.set(b(st.initialized));
        self.sealed.set(b(st.sealed));
        self.zeroized.set(b(st.zeroized));
        self.unseal_progress.set(i64::from(st.progress));
        self.unseal_threshold.set(i64::from(st.threshold));
        self.audit_failing
            .set(b(self.audit.failing.load(Ordering::Relaxed)));
        let now = tde_hsm::hsm::now();
        let age = |t: u64| i64::try_from(now.saturating_sub(t)).unwrap_or(i64::MAX);
        let keys = svc.hsm.key_overview();
        self.keys.set(keys.len() as i64);
        // Every labelled gauge is rebuilt from the state now: a key or a
        // tablespace that went away leaves no series behind.
        self.key_primary.clear();
        self.key_primary_age.clear();
        for f in [
            &self.keyfile_behind,
            &self.keyfile_lag,
            &self.keyfile_seen_age,
            &self.rekey_done,
            &self.rekey_total,
        ] {
            f.clear();
        }
        self.key_versions.clear();
        self.rekey_state.clear();
        let mut places = 0usize;
        for k in keys.iter().filter(|k| !k.tampered) {
            let kl = KeyLabels {
                key: k.name.clone(),
            };
            self.key_primary
                .get_or_create(&kl)
                .set(i64::from(k.primary));
            let primary = k.versions.iter().find(|v| v.version == k.primary);
            if let Some(p) = primary {
                self.key_primary_age.get_or_create(&kl).set(age(p.created));
            }
            for v in &k.versions {
                self.key_versions
                    .get_or_create(&VersionLabels {
                        key: k.name.clone(),
                        state: v.state.name(),
                    })
                    .inc();
            }
            // One line per (key, location): the oldest master key version
            // any data key there is wrapped under.
            let Ok(regs) = svc.registry.registrations(&k.name) else {
                continue;
            };
            let mut oldest: BTreeMap<&str, (u32, u64)> = BTreeMap::new();
            for r in &regs {
                let e = oldest
                    .entry(r.location.as_str())
                    .or_insert((r.key_version, r.last_seen));
                e.0 = e.0.min(r.key_version);
                e.1 = e.1.max(r.last_seen);
            }
            for (location, (version, seen)) in oldest {
                if places >= MAX_SERIES {
                    break;
                }
                places += 1;
                let pl = PlaceLabels {
                    key: k.name.clone(),
                    location: location.to_string(),
                };
                // Versions made after the key file's; a version made and
                // then destroyed still counts as one the file missed.
                let behind = k
                    .versions
                    .iter()
                    .filter(|v| v.version > version && v.version <= k.primary)
                    .count();
                self.keyfile_behind.get_or_create(&pl).set(behind as i64);
                let lag = match (behind, primary) {
                    (0, _) | (_, None) => 0,
                    (_, Some(p)) => age(p.created),
                };
                self.keyfile_lag.get_or_create(&pl).set(lag);
                self.keyfile_seen_age.get_or_create(&pl).set(age(seen));
            }
        }
        let rekeys = self.rekeys.lock().unwrap_or_else(|p| p.into_inner());
        for (location, r) in rekeys.iter() {
            let pl = PlaceLabels {
                key: r.key.clone(),
                location: location.clone(),
            };
            self.rekey_done
                .get_or_create(&pl)
                .set(i64::try_from(r.done).unwrap_or(i64::MAX));
            self.rekey_total
                .get_or_create(&pl)
                .set(i64::try_from(r.total).unwrap_or(i64::MAX));
            self.rekey_state
                .get_or_create(&RekeyStateLabels {
                    key: r.key.clone(),
                    location: location.clone(),
                    state: r.state.clone(),
                })
                .set(1);
        }
    }

    /// The health answer: status code and JSON body.
    pub fn health(
        &self,
        svc: &Service,
        sealed_code: Option<u16>,
    ) -> (StatusCode, serde_json::Value) {
        let st = svc.hsm.status();
        let audit_ok = !self.audit.failing.load(Ordering::Relaxed);
        let serving = st.initialized && !st.sealed && !st.zeroized && audit_ok;
        let code = if serving {
            StatusCode::OK
        } else if st.sealed
            && !st.zeroized
            && audit_ok
            && let Some(c) = sealed_code.and_then(|c| StatusCode::from_u16(c).ok())
        {
            c
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = serde_json::json!({
            "initialized": st.initialized,
            "sealed": st.sealed,
            "zeroized": st.zeroized,
            "unseal_progress": st.progress,
            "unseal_threshold": st.threshold,
            "audit_ok": audit_ok,
            "serving": serving,
            "version": env!("CARGO_PKG_VERSION"),
            "server_time_utc": tde_hsm::hsm::now(),
            "auto_unseal": svc.auto_unseal.as_ref().map(|a| a.device()),
            "auto_unseal_error": svc.auto_unseal_failure(),
        });
        (code, body)
    }
}

/// `sealedcode=N` from a query string (anything else is ignored).
fn sealed_code(uri: &Uri) -> Option<u16> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("sealedcode="))
        .and_then(|v| v.parse().ok())
        .filter(|c| (200..600).contains(c))
}

async fn metrics(State(svc): State<Arc<Service>>) -> Response {
    let done = tokio::task::spawn_blocking(move || svc.metrics.render(&svc)).await;
    match done {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "metrics failed").into_response(),
    }
}

async fn health(State(svc): State<Arc<Service>>, uri: Uri) -> Response {
    let (code, body) = svc.metrics.health(&svc, sealed_code(&uri));
    (code, axum::Json(body)).into_response()
}

/// The running listener; [`Listener::stop`] ends it.
pub struct Listener {
    handle: axum_server::Handle<SocketAddr>,
    task: tokio::task::JoinHandle<()>,
    /// The address it listens on (the port chosen when the configuration
    /// said 0).
    pub addr: SocketAddr,
}

impl Listener {
    /// Binds `cfg.listen` (the error names the address) and serves
    /// `/metrics` and `/health` until stopped.
    pub async fn start(cfg: &MetricsConfig, svc: Arc<Service>) -> anyhow::Result<Listener> {
        let addr: SocketAddr = cfg.listen.parse().with_context(|| {
            format!(
                "metrics.listen {:?} is not an address and port like 127.0.0.1:9464",
                cfg.listen
            )
        })?;
        let tcp = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding the metrics listener on {addr}"))?;
        let addr = tcp.local_addr()?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/health", get(health))
            .with_state(svc.clone());
        let handle = axum_server::Handle::new();
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => Some(
                axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                    .await
                    .with_context(|| {
                        format!(
                            "loading the metrics TLS certificate {} and key {}",
                            cert.display(),
                            key.display()
                        )
                    })?,
            ),
            _ => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let served = handle.clone();
        let task = match tls {
            Some(tls) => {
                if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
                    let _ = svc.metrics.tls.set(Tls {
                        config: tls.clone(),
                        cert: cert.clone(),
                        key: key.clone(),
                    });
                }
                let server = axum_server::from_tcp_rustls(tcp, tls)?.handle(served);
                tokio::spawn(async move {
                    if let Err(e) = server.serve(app.into_make_service()).await {
                        tracing::error!(error = %e, "the metrics listener stopped");
                    }
                })
            }
            None => {
                let server = axum_server::from_tcp(tcp)?.handle(served);
                tokio::spawn(async move {
                    if let Err(e) = server.serve(app.into_make_service()).await {
                        tracing::error!(error = %e, "the metrics listener stopped");
                    }
                })
            }
        };
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the metrics listener is reachable from other hosts: it shows key names and the seal state");
        }
        tracing::info!(url = %format!("{scheme}://{addr}/metrics"), "metrics listening");
        Ok(Listener { handle, task, addr })
    }

    /// Stops accepting and waits (briefly) for the answers in flight.
    pub async fn stop(self) {
        self.handle.graceful_shutdown(Some(Duration::from_secs(2)));
        let _ = self.task.await;
    }
}
