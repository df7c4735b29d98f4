//! A Postgres server of a test's own: `initdb` into a temporary folder and
//! `pg_ctl` on a spare port, so that the test may stop and restart it while
//! the service runs; the shared server the other tests use is never touched.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;

/// A Postgres cluster in a temporary folder, removed on drop.
pub struct OwnPostgres {
    root: PathBuf,
    port: u16,
}

/// The folders where Debian and PGDG packages put `initdb` and `pg_ctl`
/// when they are not on `PATH`.
fn program(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    if on_path {
        return PathBuf::from(name);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin").join(name))
        .filter(|path| path.is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .unwrap_or_else(|| panic!("{name} is neither on PATH nor under /usr/lib/postgresql"))
}

/// `initdb` and `postgres` refuse to run as root: as root, the cluster's
/// commands run as the `postgres` user, who owns its folder.
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// `name` as a command, run as the cluster's owner.
fn command(name: &str) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program(name));
        command
    } else {
        Command::new(program(name))
    }
}

/// Runs `args` as the cluster's owner; panics with its output if it fails.
fn run(args: &[&str]) {
    let output = command(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} did not start: {e}", args[0]));
    assert!(
        output.status.success(),
        "{args:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl OwnPostgres {
    /// Creates a cluster with trust authentication and starts it.
    pub fn start() -> OwnPostgres {
        let root = std::env::temp_dir().join(format!(
            "pretext_test_postgres_{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&root).unwrap();
        if running_as_root() {
            let status = Command::new("chown")
                .args(["postgres", root.to_str().unwrap()])
                .status()
                .unwrap();
            assert!(status.success(), "chown postgres {}", root.display());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let postgres = OwnPostgres { root, port };
        run(&[
            "initdb",
            "-D",
            postgres.data().to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        postgres.resume();
        postgres
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The server's URL, without a database name.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn resume(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.root.display()
        );
        run(&[
            "pg_ctl",
            "-D",
            self.data().to_str().unwrap(),
            "-l",
            self.root.join("server.log").to_str().unwrap(),
            "-o",
            &options,
            "-w",
            "start",
        ]);
    }

    /// Stops the server in fast mode: open transactions are rolled back and
    /// every connection is closed, as in an administrator's restart.
    pub fn stop(&self) {
        run(&[
            "pg_ctl",
            "-D",
            self.data().to_str().unwrap(),
            "-m",
            "fast",
            "-w",
            "stop",
        ]);
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = command("pg_ctl")
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
