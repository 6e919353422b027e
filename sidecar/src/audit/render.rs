//! Renderings of audit records for the tools auditors use: CSV (RFC 4180)
//! and OCSF API Activity (class 6003). Each is a pure function of the
//! stored record (and the store id), so `tde audit verify` renders the
//! records again and compares byte for byte.
//!
//! Records are read into borrowed, typed structs and written from typed
//! structs: a million records render in seconds, not minutes.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The OCSF schema version the OCSF rendering follows.
pub const OCSF_VERSION: &str = "1.3.0";

/// The attributes OCSF requires of an API Activity event: the base
/// event's and the class's own (`actor`, `api`, `src_endpoint`).
pub const OCSF_REQUIRED: &[&str] = &[
    "activity_id",
    "category_uid",
    "class_uid",
    "metadata",
    "severity_id",
    "time",
    "type_uid",
    "actor",
    "api",
    "src_endpoint",
];

type Text<'a> = Cow<'a, str>;

/// The fields of a stored record the renderings use (older records may
/// lack some; they render empty).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Rec<'a> {
    seq: u64,
    #[serde(borrow)]
    time: Text<'a>,
    time_ms: u64,
    #[serde(borrow)]
    node: Text<'a>,
    #[serde(borrow)]
    prev: Text<'a>,
    #[serde(borrow)]
    socket: Text<'a>,
    request_id: Option<u64>,
    #[serde(borrow)]
    actor: RecActor<'a>,
    #[serde(borrow)]
    op: Text<'a>,
    #[serde(borrow)]
    key: Option<Text<'a>>,
    key_version: Option<u32>,
    #[serde(borrow)]
    context: Option<BTreeMap<Text<'a>, Text<'a>>>,
    #[serde(borrow)]
    result: Text<'a>,
    #[serde(borrow)]
    error_code: Option<Text<'a>>,
    #[serde(borrow)]
    detail: Option<Text<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RecActor<'a> {
    #[serde(borrow)]
    client: Option<Text<'a>>,
    uid: Option<u32>,
    gid: Option<u32>,
    pid: Option<i32>,
    #[serde(borrow)]
    exe: Option<Text<'a>>,
    #[serde(borrow)]
    operator: Option<Text<'a>>,
    #[serde(borrow)]
    role: Option<Text<'a>>,
}

fn parse(record: &str) -> Rec<'_> {
    serde_json::from_str(record).unwrap_or_default()
}

/// The CSV header's columns.
pub const CSV_COLUMNS: &[&str] = &[
    "seq",
    "time",
    "node",
    "socket",
    "op",
    "result",
    "error_code",
    "key",
    "key_version",
    "context",
    "operator",
    "role",
    "client",
    "uid",
    "gid",
    "pid",
    "exe",
    "request_id",
    "detail",
    "prev",
];

/// One CSV cell (RFC 4180): quoted when it holds a comma, quote or line
/// break. A cell a spreadsheet would take for a formula (`=`, `+`, `-`,
/// `@`, tab, carriage return first) gets a leading `'` (OWASP's CSV
/// injection advice): a context value is the client's text.
fn csv_cell(out: &mut String, s: &str) {
    let defuse = s.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let quote = s.contains([',', '"', '\n', '\r']);
    if quote {
        out.push('"');
    }
    if defuse {
        out.push('\'');
    }
    if quote {
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(T::to_string).unwrap_or_default()
}

/// A record as one CSV row (no line break).
pub fn csv_row(record: &str) -> String {
    let r = parse(record);
    let a = &r.actor;
    let context = r
        .context
        .as_ref()
        .map(|c| serde_json::to_string(c).unwrap_or_default())
        .unwrap_or_default();
    let cells: [&str; 20] = [
        &r.seq.to_string(),
        &r.time,
        &r.node,
        &r.socket,
        &r.op,
        &r.result,
        &opt(&r.error_code),
        &opt(&r.key),
        &opt(&r.key_version),
        &context,
        &opt(&a.operator),
        &opt(&a.role),
        &opt(&a.client),
        &opt(&a.uid),
        &opt(&a.gid),
        &opt(&a.pid),
        &opt(&a.exe),
        &opt(&r.request_id),
        &opt(&r.detail),
        &r.prev,
    ];
    let mut out = String::with_capacity(record.len());
    for (i, c) in cells.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        csv_cell(&mut out, c);
    }
    out
}

/// OCSF API Activity `activity_id`: 1 create, 2 read, 3 update, 4 delete,
/// 99 other.
fn activity(op: &str) -> (u64, &'static str) {
    match op {
        "key_create" | "operator_add" | "generate_data_key" | "token_create"
        | "generate_random" | "audit_export" | "audit_key_created" => (1, "Create"),
        "status" | "key_list" | "key_describe" | "operator_list" | "decrypt" | "watch_key"
        | "approval_list" | "approval_status" | "resplit_status" | "audit_list" | "audit_read"
        | "audit_pubkey" => (2, "Read"),
        "key_rotate" | "key_enable" | "key_disable" | "key_set_rotation" | "key_share"
        | "key_unshare" | "key_cancel_destroy" | "operator_passwd" | "operator_unlock" | "seal"
        | "unseal" | "login" | "token_login" | "reload" | "re_encrypt" | "register_deks"
        | "resplit_init" | "resplit_update" | "resplit_cancel" | "approve" | "auto_rotate"
        | "audit_export_done" | "audit_key_rotate" | "rekey_report" => (3, "Update"),
        "key_destroy"
        | "key_schedule_destroy"
        | "scheduled_destroy"
        | "zeroize"
        | "tamper_zeroize"
        | "operator_remove"
        | "token_revoke"
        | "audit_prune" => (4, "Delete"),
        _ => (99, "Other"),
    }
}

#[derive(Serialize)]
struct Ocsf<'a> {
    class_uid: u32,
    class_name: &'static str,
    category_uid: u32,
    category_name: &'static str,
    activity_id: u64,
    activity_name: &'static str,
    type_uid: u64,
    type_name: String,
    time: u64,
    severity_id: u8,
    severity: &'static str,
    status_id: u8,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_detail: Option<&'a str>,
    metadata: Metadata<'a>,
    actor: OActor<'a>,
    api: Api<'a>,
    src_endpoint: Endpoint<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resources: Option<[Resource<'a>; 1]>,
    unmapped: Unmapped<'a>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    version: &'static str,
    product: Product,
    uid: String,
    sequence: u64,
    original_time: &'a str,
    log_name: &'static str,
}

#[derive(Serialize)]
struct Product {
    name: &'static str,
    vendor_name: &'static str,
}

#[derive(Serialize)]
struct OActor<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<User<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    process: Option<Process<'a>>,
    app_name: &'a str,
}

#[derive(Serialize)]
struct User<'a> {
    name: &'a str,
    type_id: u8,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    groups: Option<[Group; 1]>,
}

#[derive(Serialize)]
struct Group {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<String>,
}

#[derive(Serialize)]
struct Process<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<File<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<ProcessUser>,
}

#[derive(Serialize)]
struct File<'a> {
    name: &'a str,
    path: &'a str,
    type_id: u8,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct ProcessUser {
    uid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    groups: Option<[Group; 1]>,
}

#[derive(Serialize)]
struct Api<'a> {
    operation: &'a str,
    service: Service,
    request: Request,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<ApiResponse<'a>>,
}

#[derive(Serialize)]
struct Service {
    name: &'static str,
}

#[derive(Serialize)]
struct Request {
    uid: String,
}

#[derive(Serialize)]
struct ApiResponse<'a> {
    error: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
struct Endpoint<'a> {
    hostname: &'a str,
    svc_name: String,
}

#[derive(Serialize)]
struct Resource<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
}

#[derive(Serialize)]
struct Unmapped<'a> {
    prev: &'a str,
    socket: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a BTreeMap<Text<'a>, Text<'a>>>,
}

/// A record as one OCSF API Activity event (class 6003, OCSF 1.3.0), one
/// JSON line: the class's required `actor`, `api` and `src_endpoint`, the
/// base event's required fields, status and severity, the master key as a
/// resource, and what OCSF has no place for under `unmapped`.
pub fn ocsf_line(store: &str, record: &str) -> String {
    let r = parse(record);
    let a = &r.actor;
    let (activity_id, activity_name) = activity(&r.op);
    let ok = r.result == "ok" || r.result == "pending";
    let severity = if r.op.starts_with("tamper") {
        (5, "Critical")
    } else if ok {
        (1, "Informational")
    } else {
        (3, "Medium")
    };
    let process = (a.pid.is_some() || a.uid.is_some()).then(|| Process {
        pid: a.pid,
        uid: a.pid.is_none().then(|| format!("uid:{}", opt(&a.uid))),
        file: a.exe.as_deref().map(|exe| File {
            name: exe.rsplit('/').next().unwrap_or(exe),
            path: exe,
            type_id: 1,
            kind: "Regular File",
        }),
        user: a.uid.map(|uid| ProcessUser {
            uid: uid.to_string(),
            groups: a.gid.map(|gid| {
                [Group {
                    name: None,
                    uid: Some(gid.to_string()),
                }]
            }),
        }),
    });
    let event = Ocsf {
        class_uid: 6003,
        class_name: "API Activity",
        category_uid: 6,
        category_name: "Application Activity",
        activity_id,
        activity_name,
        type_uid: 600300 + activity_id,
        type_name: format!("API Activity: {activity_name}"),
        time: r.time_ms,
        severity_id: severity.0,
        severity: severity.1,
        status_id: if ok { 1 } else { 2 },
        status: if ok { "Success" } else { "Failure" },
        status_code: r.error_code.as_deref(),
        status_detail: r.detail.as_deref(),
        metadata: Metadata {
            version: OCSF_VERSION,
            product: Product {
                name: "tde",
                vendor_name: "tde",
            },
            uid: format!("{store}:{}", r.seq),
            sequence: r.seq,
            original_time: &r.time,
            log_name: "audit",
        },
        actor: OActor {
            user: a.operator.as_deref().map(|name| User {
                name,
                type_id: 1,
                kind: "User",
                groups: a.role.as_deref().map(|role| {
                    [Group {
                        name: Some(role.to_string()),
                        uid: None,
                    }]
                }),
            }),
            process,
            app_name: a.client.as_deref().unwrap_or("tde-sidecar"),
        },
        api: Api {
            operation: &r.op,
            service: Service { name: "tde" },
            request: Request {
                uid: r
                    .request_id
                    .map_or_else(|| format!("seq:{}", r.seq), |id| id.to_string()),
            },
            response: (!ok).then(|| ApiResponse {
                error: r.error_code.as_deref().unwrap_or(""),
                message: r.detail.as_deref().unwrap_or(""),
            }),
        },
        src_endpoint: Endpoint {
            hostname: &r.node,
            svc_name: format!("tde {} socket", r.socket),
        },
        resources: r.key.as_deref().map(|name| {
            [Resource {
                kind: "master_key",
                name,
                version: r.key_version.map(|v| v.to_string()),
            }]
        }),
        unmapped: Unmapped {
            prev: &r.prev,
            socket: &r.socket,
            context: r.context.as_ref(),
        },
    };
    serde_json::to_string(&event).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn cell(s: &str) -> String {
        let mut out = String::new();
        csv_cell(&mut out, s);
        out
    }

    #[test]
    fn csv_cells_are_quoted_and_defused() {
        assert_eq!(cell("plain"), "plain");
        assert_eq!(cell("a,b"), "\"a,b\"");
        assert_eq!(cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(cell("-1"), "'-1");
    }

    const RECORD: &str = r#"{"seq":7,"time":"2026-12-07T10:00:00.000Z","time_ms":1,"node":"h","prev":"00","socket":"data","request_id":3,"actor":{"client":"pg","uid":101,"gid":102,"pid":55,"exe":"/usr/bin/tde"},"op":"decrypt","key":"pg","key_version":2,"context":{"tablespace":"a,b"},"result":"error","error_code":"CONTEXT_MISMATCH","detail":"no"}"#;

    #[test]
    fn ocsf_has_the_required_fields() {
        let e: Value = serde_json::from_str(&ocsf_line("ab", RECORD)).expect("json");
        for k in OCSF_REQUIRED {
            assert!(!e[k].is_null(), "{k} missing: {e}");
        }
        assert_eq!(e["class_uid"], 6003);
        assert_eq!(e["type_uid"], 600302);
        assert_eq!(e["status_id"], 2);
        assert_eq!(e["api"]["operation"], "decrypt");
        assert_eq!(e["actor"]["process"]["file"]["path"], "/usr/bin/tde");
        assert_eq!(e["resources"][0]["name"], "pg");
        assert_eq!(e["metadata"]["uid"], "ab:7");
    }

    #[test]
    fn csv_row_has_every_column() {
        let row = csv_row(RECORD);
        assert!(
            row.starts_with(
                "7,2026-12-07T10:00:00.000Z,h,data,decrypt,error,CONTEXT_MISMATCH,pg,2,"
            )
        );
        assert!(row.contains(r#""{""tablespace"":""a,b""}""#), "{row}");
        assert!(row.ends_with(",/usr/bin/tde,3,no,00"), "{row}");
    }
}
