//! nginx (Debian's) in front of gateways, configured by `docs/nginx.conf` as operators are
//! told to, on a free port; stopped on drop, also when the test panics.

use crate::free_port;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

pub struct Nginx {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx before the gateways listening on `gateways`, and waits until it listens.
    pub async fn start(gateways: &[u16]) -> Nginx {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("pg_sync_nginx_{}_{port}", std::process::id()));
        for sub in ["tmp", "cache"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // Its workers run as nobody when nginx starts as root.
        let status = Command::new("chmod").args(["-R", "777"]).arg(&dir).status();
        assert!(status.is_ok_and(|s| s.success()));
        let template = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/nginx.conf");
        let servers: String = gateways
            .iter()
            .map(|p| format!("server 127.0.0.1:{p}; "))
            .collect();
        let config = std::fs::read_to_string(template)
            .unwrap()
            .replace("@DIR@", dir.to_str().unwrap())
            .replace("@LISTEN@", &format!("127.0.0.1:{port}"))
            .replace("@GATEWAYS@", &servers);
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .spawn()
            .expect("nginx starts (make setup installs nginx-light)");
        let nginx = Nginx { child, port, dir };
        tokio::time::timeout(crate::gateway::PATIENCE, async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("nginx listens");
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM: a fast shutdown of the master and its workers (KILL would leave the workers).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
