//! Users and their SCRAM-SHA-256 credentials (`CREATE USER name WITH PASSWORD '...'`, `ALTER USER`, `DROP USER`).
//!
//! A credential is kept as SCRAM keeps it, never the password: a random salt and the salted password (PBKDF2-SHA-256,
//! [`ITERATIONS`] rounds), in the state store under `users/<name>`, so it survives restarts. The superuser `weir`
//! always exists; when the server is started with a password (`WEIR_PASSWORD`, `--password-file`) it is set at
//! start, and every login needs SCRAM-SHA-256 (see [`crate::handler`]). Without one the server trusts every login
//! (local development), and the credentials wait until it is started with a password.
//!
//! Privileges (`GRANT` / `REVOKE`): `SELECT` and `INSERT` on named relations (or `ON ALL TABLES IN SCHEMA public`),
//! and `CREATE` (`ON SCHEMA public` or `ON DATABASE weir`: every DDL statement), kept under `grants/<user>`. The
//! superuser has them all; the others have what they were granted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use pgwire::api::auth::sasl::scram::{gen_salted_password, random_nonce};
use pgwire::api::auth::{AuthSource, LoginInfo, Password};
use pgwire::error::{PgWireError, PgWireResult};
use weir_common::{ErrorReport, SqlState};
use weir_runtime::state::{StateStore, StateTable, WriteBatch};

/// PBKDF2 rounds of a stored credential (SCRAM's minimum and Postgres' default).
pub const ITERATIONS: usize = 4096;

/// The superuser, who always exists and alone manages users.
pub const SUPERUSER: &str = "weir";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Credential {
    salt: Vec<u8>,
    salted: Vec<u8>,
}

/// What a user may do besides reading the system catalogs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// Read a relation.
    Select,
    /// Insert into a table.
    Insert,
    /// Run DDL: create and drop sources, tables, views and sinks.
    Create,
}

/// A user's privileges: `*` among the relations stands for every relation of the schema.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Grants {
    create: bool,
    select: BTreeSet<String>,
    insert: BTreeSet<String>,
}

impl Grants {
    fn relations(&mut self, privilege: Privilege) -> Option<&mut BTreeSet<String>> {
        match privilege {
            Privilege::Select => Some(&mut self.select),
            Privilege::Insert => Some(&mut self.insert),
            Privilege::Create => None,
        }
    }
}

/// The server's users: name to credential (`None`: a user without a password, who cannot log in when logins need
/// one).
#[derive(Debug)]
pub struct Users {
    state: Arc<dyn StateStore>,
    table: StateTable,
    users: RwLock<BTreeMap<String, Option<Credential>>>,
    grants_table: StateTable,
    grants: RwLock<BTreeMap<String, Grants>>,
}

fn store_error(err: impl std::fmt::Display) -> ErrorReport {
    ErrorReport::new(SqlState::IO_ERROR, format!("the users could not be written: {err}"))
}

impl Users {
    /// The users kept in `state`, and the superuser.
    pub fn open(state: Arc<dyn StateStore>) -> Result<Self, ErrorReport> {
        let table = StateTable::new("users");
        let mut users = BTreeMap::new();
        users.insert(SUPERUSER.to_string(), None);
        for (key, value) in table.scan_all(state.as_ref()).map_err(store_error)? {
            let name = String::from_utf8_lossy(&key).into_owned();
            let credential = match value.split_first() {
                Some((&length, rest)) if rest.len() > usize::from(length) => {
                    let (salt, salted) = rest.split_at(usize::from(length));
                    Some(Credential { salt: salt.to_vec(), salted: salted.to_vec() })
                }
                _ => None,
            };
            users.insert(name, credential);
        }
        let grants_table = StateTable::new("grants");
        let mut grants = BTreeMap::new();
        for (key, value) in grants_table.scan_all(state.as_ref()).map_err(store_error)? {
            let granted: Grants = serde_json::from_slice(&value).map_err(store_error)?;
            grants.insert(String::from_utf8_lossy(&key).into_owned(), granted);
        }
        Ok(Users { state, table, users: RwLock::new(users), grants_table, grants: RwLock::new(grants) })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Option<Credential>>> {
        self.users.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Option<Credential>>> {
        self.users.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn exists(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// Every user's name.
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Creates user `name` (with `password`, if given), or changes an existing one's password when `alter`.
    pub fn set(&self, name: &str, password: Option<&str>, alter: bool) -> Result<(), ErrorReport> {
        let mut users = self.write();
        match (users.contains_key(name), alter) {
            (true, false) => {
                return Err(ErrorReport::new(SqlState::DUPLICATE_OBJECT, format!("role \"{name}\" already exists")));
            }
            (false, true) => {
                return Err(ErrorReport::new(SqlState::UNDEFINED_OBJECT, format!("role \"{name}\" does not exist")));
            }
            _ => {}
        }
        let credential = password.map(|password| {
            // SCRAM's own random nonce (18 random bytes, base64) makes a salt as good as any.
            let salt = random_nonce().into_bytes();
            Credential { salted: gen_salted_password(password, &salt, ITERATIONS), salt }
        });
        let mut value = Vec::new();
        if let Some(c) = &credential {
            value.push(c.salt.len() as u8);
            value.extend_from_slice(&c.salt);
            value.extend_from_slice(&c.salted);
        }
        let mut batch = WriteBatch::default();
        batch.put(self.table.key(name.as_bytes()), value);
        self.state.write(&batch).map_err(store_error)?;
        users.insert(name.to_string(), credential);
        Ok(())
    }

    /// Drops user `name`; the superuser cannot be dropped.
    pub fn drop_user(&self, name: &str, if_exists: bool) -> Result<(), ErrorReport> {
        if name == SUPERUSER {
            return Err(ErrorReport::new(
                SqlState::INSUFFICIENT_PRIVILEGE,
                format!("the superuser \"{SUPERUSER}\" cannot be dropped"),
            ));
        }
        let mut users = self.write();
        if !users.contains_key(name) {
            return match if_exists {
                true => Ok(()),
                false => Err(ErrorReport::new(SqlState::UNDEFINED_OBJECT, format!("role \"{name}\" does not exist"))),
            };
        }
        let mut batch = WriteBatch::default();
        batch.delete(self.table.key(name.as_bytes()));
        batch.delete(self.grants_table.key(name.as_bytes()));
        self.state.write(&batch).map_err(store_error)?;
        users.remove(name);
        self.grants.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(name);
        Ok(())
    }

    /// Grants (or with `grant` false, revokes) `privilege` to `user`: on `relation` for `SELECT` and `INSERT` (`*`:
    /// every relation), on the schema for `CREATE`.
    pub fn change(&self, user: &str, privilege: Privilege, relation: &str, grant: bool) -> Result<(), ErrorReport> {
        if !self.exists(user) {
            return Err(ErrorReport::new(SqlState::UNDEFINED_OBJECT, format!("role \"{user}\" does not exist")));
        }
        let mut grants = self.grants.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut changed = grants.get(user).cloned().unwrap_or_default();
        match changed.relations(privilege) {
            Some(relations) if grant => {
                relations.insert(relation.to_string());
            }
            Some(relations) => {
                relations.remove(relation);
            }
            None => changed.create = grant,
        }
        let mut batch = WriteBatch::default();
        batch.put(self.grants_table.key(user.as_bytes()), serde_json::to_vec(&changed).map_err(store_error)?);
        self.state.write(&batch).map_err(store_error)?;
        grants.insert(user.to_string(), changed);
        Ok(())
    }

    /// Whether `user` may use `privilege` (on `relation`, for `SELECT` and `INSERT`).
    pub fn allowed(&self, user: &str, privilege: Privilege, relation: &str) -> bool {
        if user == SUPERUSER {
            return true;
        }
        let grants = self.grants.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(granted) = grants.get(user) else { return false };
        match privilege {
            Privilege::Create => granted.create,
            Privilege::Select => granted.select.contains(relation) || granted.select.contains("*"),
            Privilege::Insert => granted.insert.contains(relation) || granted.insert.contains("*"),
        }
    }

    /// Forgets the privileges on a dropped relation (one made again under its name starts without them).
    pub fn forget_relation(&self, relation: &str) {
        let mut grants = self.grants.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut batch = WriteBatch::default();
        for (user, granted) in grants.iter_mut() {
            if granted.select.remove(relation) | granted.insert.remove(relation)
                && let Ok(value) = serde_json::to_vec(&*granted)
            {
                batch.put(self.grants_table.key(user.as_bytes()), value);
            }
        }
        if let Err(err) = self.state.write(&batch) {
            tracing::warn!(%relation, error = %err, "the privileges on a dropped relation could not be forgotten");
        }
    }
}

/// The credentials SCRAM checks a login against. A user without a password, or no such user, fails as a wrong
/// password does (`28P01`, as Postgres says it, and logged: see the connection handler's error handler).
#[async_trait]
impl AuthSource for Users {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        match self.read().get(user) {
            Some(Some(credential)) => Ok(Password::new(Some(credential.salt.clone()), credential.salted.clone())),
            // Refused as a wrong password is (the connection handler words and logs it).
            _ => Err(PgWireError::InvalidPassword(user.to_string())),
        }
    }
}
