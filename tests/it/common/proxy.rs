//! A TCP proxy that a test can cut, put in front of a server (the object
//! store) to make it go away and come back: while cut, the connections it
//! carries are dropped mid-transfer and new ones are closed at once.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The proxy; it stops with its test's runtime.
pub struct CuttableProxy {
    pub address: SocketAddr,
    up: Arc<watch::Sender<bool>>,
}

impl CuttableProxy {
    /// Forwards a free loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> CuttableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let up = Arc::new(watch::Sender::new(true));
        let state = up.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !*state.borrow() {
                    let _ = client.shutdown().await;
                    continue;
                }
                let mut cut = state.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        CuttableProxy { address, up }
    }

    /// The proxy's URL, for an HTTP upstream.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Drops every connection and refuses new ones until [`Self::restore`].
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// Carries connections again.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}
