//! Cancelling statements: what each connection runs now ([`Running`]) and the registry of connections by the cancel
//! key their clients were given ([`CancelKeys`]). The engine owns the registry; the protocol handler registers each
//! connection and answers `CancelRequest`s through it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::exec::StatementToken;

/// The statement a connection runs now (or ran last), so that a `CancelRequest` can stop it.
#[derive(Debug, Default)]
pub struct Running {
    token: Mutex<Option<Arc<StatementToken>>>,
}

impl Running {
    /// A token for the statement about to run; a cancel from now on reaches it.
    pub(crate) fn start(&self) -> Arc<StatementToken> {
        let token = Arc::new(StatementToken::default());
        *self.token.lock().unwrap_or_else(PoisonError::into_inner) = Some(token.clone());
        token
    }

    pub(crate) fn cancel(&self) {
        if let Some(token) = self.token.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            token.cancel();
        }
    }
}

/// Every connection's [`Running`], by the process id and secret key its client was given at startup.
#[derive(Debug, Default)]
pub struct CancelKeys {
    keys: Mutex<HashMap<(i32, bytes::Bytes), Weak<Running>>>,
}

impl CancelKeys {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, bytes::Bytes), Weak<Running>>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The running statement of the connection with `key`, while it lives.
    pub(crate) fn get(&self, key: &(i32, bytes::Bytes)) -> Option<Arc<Running>> {
        self.lock().get(key).and_then(Weak::upgrade)
    }

    pub(crate) fn insert(&self, key: (i32, bytes::Bytes), running: &Arc<Running>) {
        self.lock().insert(key, Arc::downgrade(running));
    }

    pub(crate) fn remove(&self, key: &(i32, bytes::Bytes)) {
        self.lock().remove(key);
    }
}
