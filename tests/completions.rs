//! The CLI's outputs for people and tools that need no sidecar:
//! `tde serve --print-config` (TOML, or JSON with `--json`), and shell
//! completions and manual pages from the CLI's own definition:
//! `tde completions SHELL` loads in bash and completes subcommands and
//! options; `tde man --out DIR` writes pages that `man -l` renders without
//! a warning. Neither needs a configuration.

use std::path::Path;
use std::process::{Command, Output};

fn tde(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tde"))
        .args(args)
        // A configuration that does not load must not matter.
        .env("TDE_CONFIG", "/nonexistent/tde.toml")
        .output()
        .expect("run tde")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn bash_completion_loads_and_completes_subcommands_and_options() {
    let out = tde(&["completions", "bash"]);
    assert!(out.status.success(), "{}", text(&out));
    let dir = tempfile::tempdir().expect("tmp");
    let script = dir.path().join("tde.bash");
    std::fs::write(&script, &out.stdout).expect("write");
    // What bash does on TAB: the words so far, the completion function,
    // the candidates it leaves in COMPREPLY.
    let probe = format!(
        r#"source '{}' || exit 9
complete -p tde
comp() {{
  COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${{#COMP_LINE}}
  COMPREPLY=()
  _tde tde "${{COMP_WORDS[$COMP_CWORD]}}" "${{COMP_WORDS[$COMP_CWORD - 1]}}"
  echo "$*: ${{COMPREPLY[*]}}"
}}
comp tde uns
comp tde key cr
comp tde key create --rot
comp tde audit ex
comp tde key create --adm
"#,
        script.display()
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &probe])
        .output()
        .expect("bash");
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let lines: Vec<&str> = t.lines().collect();
    assert!(
        lines[0].starts_with("complete ") && lines[0].ends_with(" -F _tde tde"),
        "{t}"
    );
    assert_eq!(lines[1], "tde uns: unseal", "{t}");
    assert_eq!(lines[2], "tde key cr: create", "{t}");
    assert_eq!(lines[3], "tde key create --rot: --rotate-after", "{t}");
    assert_eq!(lines[4], "tde audit ex: export", "{t}");
    assert_eq!(lines[5], "tde key create --adm: --admin-socket", "{t}");
}

/// Each command's help shows the global options it uses and no others;
/// they are accepted before or after the command, as before.
#[test]
fn help_shows_only_the_global_options_a_command_uses() {
    let help = |args: &[&str]| {
        let out = tde(args);
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    for (args, shown, hidden) in [
        (
            &["inspect", "--help"][..],
            &["--json"][..],
            &[
                "--admin-socket",
                "--data-socket",
                "--operator",
                "--password-file",
                "--config",
                "--data-dir",
            ][..],
        ),
        (
            &["umount", "--help"],
            &["--json"],
            &["--operator", "--config"],
        ),
        (
            &["mount", "--help"],
            &["--config", "--data-socket", "--json"],
            &["--admin-socket", "--operator", "--password-file"],
        ),
        (
            &["serve", "--help"],
            &["--config", "--data-dir"],
            &["--admin-socket", "--data-socket", "--operator"],
        ),
        (
            &["unseal", "--help"],
            &["--admin-socket"],
            &["--operator", "--password-file", "--data-socket"],
        ),
        (
            &["key", "create", "--help"],
            &["--admin-socket", "--operator", "--password-file"],
            &["--data-socket"],
        ),
        (
            &["encrypt", "--help"],
            &["--data-socket", "--operator", "--admin-socket"],
            &[],
        ),
    ] {
        let h = help(args);
        for o in shown {
            assert!(
                h.contains(&format!("{o} ")) || h.contains(&format!("{o}\n")),
                "{args:?} lacks {o}:\n{h}"
            );
        }
        for o in hidden {
            assert!(!h.contains(o), "{args:?} shows {o}:\n{h}");
        }
    }
    // Still accepted where they apply, before or after the command.
    for args in [
        &[
            "--operator",
            "x",
            "--admin-socket",
            "/nonexistent",
            "key",
            "list",
        ][..],
        &[
            "key",
            "list",
            "--operator",
            "x",
            "--admin-socket",
            "/nonexistent",
        ],
    ] {
        let out = tde(args);
        let t = text(&out);
        assert!(t.contains("/nonexistent"), "{args:?}: {t}");
    }
}

#[test]
fn zsh_and_fish_scripts_name_the_commands() {
    let zsh = tde(&["completions", "zsh"]);
    assert!(zsh.status.success(), "{}", text(&zsh));
    let z = String::from_utf8_lossy(&zsh.stdout);
    assert!(z.starts_with("#compdef tde"), "{}", &z[..z.len().min(200)]);
    assert!(z.contains("'unseal:") && z.contains("--rotate-after"));
    let fish = tde(&["completions", "fish"]);
    assert!(fish.status.success(), "{}", text(&fish));
    let f = String::from_utf8_lossy(&fish.stdout);
    assert!(f.contains("complete -c tde") && f.contains("-a \"unseal\""));
    let bad = tde(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(
        text(&bad).contains("invalid value 'tcsh'"),
        "{}",
        text(&bad)
    );
}

fn man(page: &Path) -> Output {
    Command::new("man")
        .args(["--warnings", "-P", "cat", "-l"])
        .arg(page)
        .env("MANWIDTH", "80")
        .output()
        .expect("man (Debian: man-db)")
}

#[test]
fn manual_pages_render_for_the_command_and_every_subcommand() {
    let dir = tempfile::tempdir().expect("tmp");
    let out_dir = dir.path().join("man1");
    let out = tde(&["--json", "man", "--out", out_dir.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", text(&out));
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let pages: Vec<_> = std::fs::read_dir(&out_dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(said["pages"].as_u64(), Some(pages.len() as u64));
    for want in [
        "tde.1",
        "tde-unseal.1",
        "tde-key-create.1",
        "tde-audit-export.1",
    ] {
        assert!(out_dir.join(want).is_file(), "{want} in {pages:?}");
    }
    for page in &pages {
        let r = man(page);
        assert!(r.status.success(), "{}: {}", page.display(), text(&r));
        assert!(
            r.stderr.is_empty(),
            "{}: {}",
            page.display(),
            String::from_utf8_lossy(&r.stderr)
        );
        let t = String::from_utf8_lossy(&r.stdout);
        assert!(t.contains("NAME") && t.contains("SYNOPSIS"), "{t}");
    }
    let top = String::from_utf8_lossy(&man(&out_dir.join("tde.1")).stdout).to_string();
    assert!(
        top.contains("SUBCOMMANDS") && top.contains("tde-unseal(1)"),
        "{top}"
    );
    let create =
        String::from_utf8_lossy(&man(&out_dir.join("tde-key-create.1")).stdout).to_string();
    assert!(
        create.contains("tde-key-create - Create a master key")
            && create.contains("--rotate-after"),
        "{create}"
    );
}

#[test]
fn print_config_shows_the_effective_configuration_as_toml_or_json() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("tde.toml");
    std::fs::write(
        &config,
        "data_dir = \"/srv/tde\"\n[audit]\npkcs11_key_use = \"summarize\"\n[audit.syslog]\nsocket = \"/dev/log\"\n",
    )
    .expect("config");
    let run = |json: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tde"));
        c.args(["serve", "--print-config"])
            .env("TDE_CONFIG", &config)
            .env("TDE_LOG__LEVEL", "debug")
            .env_remove("TDE_DATA_DIR");
        if json {
            c.arg("--json");
        }
        c.output().expect("tde serve --print-config")
    };
    let toml = run(false);
    assert!(toml.status.success(), "{}", text(&toml));
    let t = String::from_utf8_lossy(&toml.stdout);
    assert!(t.contains("data_dir = \"/srv/tde\""), "{t}");
    assert!(t.contains("pkcs11_key_use = \"summarize\""), "{t}");
    let json = run(true);
    assert!(json.status.success(), "{}", text(&json));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("one JSON document");
    assert_eq!(v["data_dir"], "/srv/tde");
    assert_eq!(v["audit"]["pkcs11_key_use"], "summarize");
    assert_eq!(v["audit"]["syslog"]["socket"], "/dev/log");
    assert_eq!(
        v["log"]["level"], "debug",
        "the environment overrides the file"
    );
    assert_eq!(v["audit"]["routine_reads"], "record", "defaults are shown");
}
