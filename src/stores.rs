//! The stores `storage.backend` names: redb files and the key ring's file
//! in the data directory (the embedded default, one broker), or one
//! PostgreSQL database. Either way the actors get the same four contracts.

use std::path::PathBuf;
use std::sync::Arc;

use agentkeys_actors::auth::Replicated;
use agentkeys_actors::grant::SharedGates;
use agentkeys_actors::sealing::Sealer;
use agentkeys_actors::storage::file_key_ring::{FileKeyRing, KEYRING_FILE};
use agentkeys_actors::storage::redb_ledger::RedbLedger;
use agentkeys_actors::storage::redb_store::{RedbAgentStore, RedbGrantStore};
use agentkeys_actors::storage::{
    AgentStore, AuditLedger, GrantStore, KeyRingAsItIs, KeyRingStore, Leadership, Membership,
    StorageError,
};

use crate::settings::{Settings, StorageBackend};

/// The audit ledger's file under the data directory (redb).
pub const LEDGER_FILE: &str = "audit.redb";
/// The agent registry's and the grants' files (redb).
pub const AGENTS_FILE: &str = "agents.redb";
pub const GRANTS_FILE: &str = "grants.redb";

pub struct Stores {
    pub agents: Arc<dyn AgentStore>,
    pub grants: Arc<dyn GrantStore>,
    pub ledger: Arc<dyn AuditLedger>,
    pub key_ring: Arc<dyn KeyRingStore>,
    /// What replicas share beyond the stores above
    /// (`storage.postgres.replicas`); `None`: one broker, whose memory
    /// decides.
    pub replica: Option<ReplicaStores>,
}

/// What brokers running as replicas on one database decide with.
pub struct ReplicaStores {
    /// Limited grants' uses and Idempotency-Keys.
    pub gates: SharedGates,
    /// Proof and login nonces, and the key login challenges are sealed
    /// with.
    pub sign_in: Replicated,
    /// Who is alive, to split the rate budgets.
    pub membership: Arc<dyn Membership>,
    /// Which replica sends the audit anchors.
    pub anchoring: Arc<dyn Leadership>,
}

impl Stores {
    /// Opens (or creates) every store for the one broker that writes
    /// them; on PostgreSQL, connects, brings the schema up to date and
    /// claims it (refused while another broker writes it).
    pub fn open(settings: &Settings, sealer: &Sealer) -> Result<Self, StorageError> {
        Self::open_with(settings, sealer, true)
    }

    /// Opens every store to read it, as it is: on PostgreSQL a schema that
    /// is absent or at another version is refused, never made or migrated,
    /// and the key ring is never written back (an auditor's run changes
    /// nothing).
    pub fn open_as_they_are(settings: &Settings, sealer: &Sealer) -> Result<Self, StorageError> {
        let mut stores = Self::open_with(settings, sealer, false)?;
        stores.key_ring = Arc::new(KeyRingAsItIs(stores.key_ring));
        Ok(stores)
    }

    fn open_with(
        settings: &Settings,
        sealer: &Sealer,
        migrate: bool,
    ) -> Result<Self, StorageError> {
        match settings.storage.backend {
            StorageBackend::Redb => {
                let file = |name: &str| settings.storage.data_dir.join(name);
                let cache = settings.cache_bytes();
                Ok(Self {
                    agents: Arc::new(RedbAgentStore::open(&file(AGENTS_FILE), cache)?),
                    grants: Arc::new(RedbGrantStore::open(
                        &file(GRANTS_FILE),
                        cache,
                        sealer.clone(),
                    )?),
                    ledger: Arc::new(RedbLedger::open(&file(LEDGER_FILE), cache)?),
                    key_ring: Arc::new(FileKeyRing::in_dir(&settings.storage.data_dir)),
                    replica: None,
                })
            }
            StorageBackend::Postgres => postgres(settings, sealer, migrate),
        }
    }

    /// What must exist before stores are opened to be read (not created):
    /// on redb, the ledger's, the grants' and the key ring's files.
    pub fn expected_files(settings: &Settings) -> Vec<PathBuf> {
        match settings.storage.backend {
            StorageBackend::Redb => [LEDGER_FILE, GRANTS_FILE, KEYRING_FILE]
                .iter()
                .map(|name| settings.storage.data_dir.join(name))
                .collect(),
            StorageBackend::Postgres => Vec::new(),
        }
    }
}

#[cfg(feature = "postgres")]
fn postgres(settings: &Settings, sealer: &Sealer, migrate: bool) -> Result<Stores, StorageError> {
    use agentkeys_actors::storage::postgres::agents::PostgresAgentStore;
    use agentkeys_actors::storage::postgres::grants::PostgresGrantStore;
    use agentkeys_actors::storage::postgres::key_ring::PostgresKeyRing;
    use agentkeys_actors::storage::postgres::ledger::PostgresLedger;
    use agentkeys_actors::storage::postgres::{Postgres, Schema};
    // A broker: the one that writes this schema, or none.
    let schema = if migrate {
        Schema::Claim
    } else {
        Schema::AsItIs
    };
    let pg = postgres_settings(settings)?;
    let db = Postgres::open(&pg, schema)?;
    let database: Arc<dyn KeyRingStore> = Arc::new(PostgresKeyRing::new(db.clone()));
    let key_ring = match migrate {
        true => Arc::new(KeyRingMovingIn {
            data_dir: settings.storage.data_dir.clone(),
            database,
        }),
        false => database,
    };
    let grants = Arc::new(PostgresGrantStore::new(db.clone(), sealer.clone()));
    let ledger = Arc::new(PostgresLedger::new(db.clone()));
    let agents = Arc::new(PostgresAgentStore::new(db.clone()));
    let replica = pg.replicas.then(|| ReplicaStores {
        gates: SharedGates {
            uses: ledger.clone(),
            slots: grants.clone(),
        },
        sign_in: Replicated {
            nonces: agents.clone(),
            sealer: sealer.clone(),
        },
        membership: db.clone(),
        anchoring: db,
    });
    Ok(Stores {
        agents,
        grants,
        ledger,
        key_ring,
        replica,
    })
}

/// Where a key ring moved into the database is left: the ring as it was
/// moved (sealed), for a backup to hold.
pub const MOVED_KEYRING_FILE: &str = "keyring.json.moved";

/// The key ring in the database, moved in from a `keyring.json` left in
/// the data directory (by redb, or by a broker from before the ring lived
/// in the database) while the database holds none: the file's ring is
/// loaded at revision 0, so the key ring (having sealed any plain key)
/// saves it, and the first save into the database retires the file. The
/// same keys keep signing and stay published.
#[cfg(feature = "postgres")]
struct KeyRingMovingIn {
    data_dir: PathBuf,
    database: Arc<dyn KeyRingStore>,
}

#[cfg(feature = "postgres")]
impl KeyRingStore for KeyRingMovingIn {
    fn load(&self) -> Result<Option<(serde_json::Value, u64)>, StorageError> {
        let file = FileKeyRing::in_dir(&self.data_dir);
        match self.database.load()? {
            Some(stored) => {
                if self.data_dir.join(KEYRING_FILE).exists() {
                    tracing::warn!(
                        "{KEYRING_FILE} in the data directory is not read: the key ring is in \
                         the database; move the file away"
                    );
                }
                Ok(Some(stored))
            }
            None => Ok(file.load()?.map(|(ring, _)| (ring, 0))),
        }
    }

    /// The file is replaced by the ring as saved (every private key
    /// sealed), under [`MOVED_KEYRING_FILE`], written before the database
    /// is: whatever fails after, no plain key is left behind for good.
    fn save(&self, ring: &serde_json::Value, revision: u64) -> Result<u64, StorageError> {
        let file = self.data_dir.join(KEYRING_FILE);
        let moving = revision == 0 && file.exists();
        if moving {
            let moved = self.data_dir.join(MOVED_KEYRING_FILE);
            let bytes =
                serde_json::to_vec_pretty(ring).map_err(|e| StorageError::Backend(e.into()))?;
            agentkeys_actors::data_dir::replace_owner_only(&moved, &bytes)
                .map_err(|e| StorageError::Backend(Box::new(e)))?;
        }
        let next = self.database.save(ring, revision)?;
        if moving {
            match std::fs::remove_file(&file) {
                Ok(()) => tracing::info!(
                    "moved {KEYRING_FILE} into the database (sealed, as {MOVED_KEYRING_FILE})"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "the key ring is in the database now; remove {KEYRING_FILE} by hand"
                ),
            }
        }
        Ok(next)
    }
}

/// Refused by the settings' validation before this is reached.
#[cfg(not(feature = "postgres"))]
fn postgres(_: &Settings, _: &Sealer, _: bool) -> Result<Stores, StorageError> {
    Err(StorageError::Backend(
        "this broker was built without the postgres feature".into(),
    ))
}

/// The database's settings, its password read from `password_file`.
#[cfg(feature = "postgres")]
fn postgres_settings(
    settings: &Settings,
) -> Result<agentkeys_actors::storage::postgres::PostgresSettings, StorageError> {
    use std::time::Duration;
    let pg = settings.storage.postgres.as_ref().ok_or_else(|| {
        StorageError::Backend("storage.backend = \"postgres\" needs [storage.postgres]".into())
    })?;
    let password = pg.password_file.as_deref().map(password_in).transpose()?;
    Ok(agentkeys_actors::storage::postgres::PostgresSettings {
        url: pg.url.clone(),
        password,
        schema: pg.schema.clone(),
        pool_size: pg.pool_size,
        connect_timeout: Duration::from_millis(pg.connect_timeout_ms),
        call_timeout: Duration::from_millis(pg.call_timeout_ms),
        ca_file: pg.ca_file.clone(),
        replicas: pg.replicas,
    })
}

/// The database's password, from a file only its owner may read.
#[cfg(feature = "postgres")]
fn password_in(file: &std::path::Path) -> Result<String, StorageError> {
    use std::os::unix::fs::PermissionsExt;
    let refused = |why: String| {
        StorageError::Backend(
            format!("storage.postgres.password_file {}: {why}", file.display()).into(),
        )
    };
    let mode = std::fs::metadata(file)
        .map_err(|e| refused(e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(refused(format!(
            "readable by others (mode {:o}): chmod 600 it",
            mode & 0o777
        )));
    }
    let text = std::fs::read_to_string(file).map_err(|e| refused(e.to_string()))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}
