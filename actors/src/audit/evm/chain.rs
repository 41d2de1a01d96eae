//! `AnchorChain`: the EVM chain anchors go to, through alloy. An HTTP(S)
//! provider; the anchoring key as a local signer (or, on a development
//! node, an account the node has unlocked); the nonce, gas limit and
//! EIP-1559 fees filled by the library from the chain at each send. Every
//! call blocks on the chain's own small runtime and is bounded by the HTTP
//! client's timeout, so a dead endpoint costs a sink worker seconds, never
//! a hang. The same reads serve the sink, `audit verify` and
//! `audit verify-proof`.

use std::time::Duration;

use alloy::consensus::Transaction as _;
use alloy::eips::{BlockId, BlockNumberOrTag};
use alloy::network::{EthereumWallet, TransactionBuilder, TransactionResponse};
use alloy::primitives::{Address, Bytes, TxHash, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{Filter, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolCall, SolEvent};
use alloy::transports::http::reqwest;
use alloy::transports::TransportError;

use super::Anchor;
use crate::blocking::BlockingRuntime;

alloy::sol! {
    /// What the sink reads of contracts/AgentKeysAudit.sol.
    function anchor(uint64 fromSeq, uint64 toSeq, bytes32 root, uint8 version) external;
    function lastSeq() external view returns (uint64);
    event Anchored(
        uint64 indexed fromSeq, uint64 toSeq, bytes32 root, bytes32 prevRoot, uint8 version, address indexed anchorer
    );
    /// Why the contract refuses an anchor.
    #[derive(Debug)]
    interface AgentKeysAudit {
        error NotOwner();
        error NotAnchorer();
        error NotNext(uint64 expected, uint64 fromSeq);
        error EmptyRange();
    }
}

/// One RPC call's longest wait.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// `url` as [`shown`]: a provider's URL often carries its API key.
    #[error("rpc_url {url}: {detail}")]
    Endpoint { url: String, detail: String },
    #[error("the chain's fees ({wanted} wei per gas) are above max_fee_per_gas_gwei ({ceiling} wei): waiting for them to fall")]
    FeeCeiling { wanted: u128, ceiling: u128 },
    #[error("a runtime for the chain client: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("{call}: {source}")]
    Rpc {
        call: &'static str,
        #[source]
        source: TransportError,
    },
    #[error("{0}")]
    Contract(String),
}

/// Where a transaction stands on the chain the endpoint serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxState {
    /// The node does not know it: dropped from its pool, or reorganised
    /// away with its block.
    Unknown,
    /// Waiting to be mined, or its block being reorganised.
    Pending(PendingTx),
    Mined(MinedTx),
}

/// What a replacement must outbid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingTx {
    pub nonce: u64,
    pub gas_limit: u64,
    pub max_fee_per_gas: u128,
    pub max_priority_fee_per_gas: u128,
}

/// A transaction in the canonical chain, as the node reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MinedTx {
    pub block: u64,
    pub block_hash: B256,
    /// Blocks from its own to the latest, both counted (1: just mined).
    pub depth: u64,
    pub succeeded: bool,
    pub from: Address,
    pub to: Option<Address>,
    pub input: Bytes,
    pub gas_used: u64,
}

impl MinedTx {
    /// Why this is not an anchor sent by `from` (to `to`, when it matters)
    /// carrying `data` (hex, no `0x`) that succeeded; `Ok` when it is one.
    pub fn carries(&self, from: Address, to: Option<Address>, data: &str) -> Result<(), String> {
        if !self.succeeded {
            return Err("did not succeed in the block it names".into());
        }
        if self.from != from || to.is_some_and(|to| self.to != Some(to)) {
            let to_text = self.to.map_or("nobody".into(), |a| a.to_string());
            let expected = to.map_or(String::new(), |to| format!(" to {to}"));
            return Err(format!(
                "went from {} to {to_text}, not from {from}{expected}",
                self.from
            ));
        }
        if hex::encode(&self.input) != data.to_lowercase() {
            return Err("carries another anchor".into());
        }
        Ok(())
    }
}

/// `url` as errors and logs show it: scheme, host and port only (a
/// provider's path or query often holds its API key).
pub fn shown(url: &str) -> String {
    match url.parse::<reqwest::Url>() {
        Ok(parsed) => {
            let port = parsed.port().map_or(String::new(), |p| format!(":{p}"));
            let host = parsed.host_str().unwrap_or_default();
            format!("{}://{host}{port}/…", parsed.scheme())
        }
        Err(_) => "(not a URL)".into(),
    }
}

/// An address from config or a proof.
pub fn address(text: &str) -> Result<Address, ChainError> {
    text.parse()
        .map_err(|_| ChainError::Contract(format!("{text} is not an EVM address")))
}

pub struct AnchorChain {
    provider: DynProvider,
    runtime: BlockingRuntime,
    /// The endpoint, to be cut out of errors, and how to show it instead.
    url: reqwest::Url,
    url_shown: String,
    /// The most a send may offer per gas (wei).
    fee_ceiling: Option<u128>,
    /// The chain the endpoint must serve, when the config names one.
    expected_chain: Option<u64>,
    /// The anchoring account.
    from: Address,
    /// Where anchors go: the contract, or `to`, or the sender itself.
    to: Address,
    contract: Option<Address>,
    /// The first block anchors are looked for in (the contract's).
    start_block: u64,
}

impl AnchorChain {
    /// A client of the chain at `url` for anchors from `from` (to
    /// `contract`, or `to`, or itself), signed with `key` when given, else
    /// by the node (an unlocked account: development nodes only).
    pub fn connect(
        url: &str,
        from: Address,
        to: Option<Address>,
        contract: Option<Address>,
        key: Option<PrivateKeySigner>,
        start_block: u64,
    ) -> Result<Self, ChainError> {
        let endpoint = |detail: String| ChainError::Endpoint {
            url: shown(url),
            detail,
        };
        let parsed: reqwest::Url = url.parse().map_err(|e| endpoint(format!("{e}")))?;
        let client = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| endpoint(e.to_string()))?;
        // The nonce from the chain at every send (not a cached count, which
        // a dropped or reorganised transaction would leave too high).
        let builder = ProviderBuilder::new()
            .disable_recommended_fillers()
            .with_gas_estimation()
            .with_simple_nonce_management()
            .fetch_chain_id();
        let provider = match key {
            Some(key) => builder
                .wallet(EthereumWallet::from(key))
                .connect_reqwest(client, parsed.clone())
                .erased(),
            None => builder.connect_reqwest(client, parsed.clone()).erased(),
        };
        Ok(Self {
            provider,
            runtime: BlockingRuntime::new("evm-anchor").map_err(ChainError::Runtime)?,
            url_shown: shown(url),
            url: parsed,
            fee_ceiling: None,
            expected_chain: None,
            from,
            to: contract.or(to).unwrap_or(from),
            contract,
            start_block,
        })
    }

    /// Sends offer at most `wei` per gas.
    pub fn with_fee_ceiling(self, wei: u128) -> Self {
        Self {
            fee_ceiling: Some(wei),
            ..self
        }
    }

    /// The endpoint must serve chain `id` ([`Self::check_chain_id`]).
    pub fn expecting_chain(self, id: Option<u64>) -> Self {
        Self {
            expected_chain: id,
            ..self
        }
    }

    /// Whether the endpoint serves the chain expected of it, if any: an
    /// anchor on another chain (a testnet, a fork) proves nothing.
    pub fn check_chain_id(&self) -> Result<(), ChainError> {
        let Some(expected) = self.expected_chain else {
            return Ok(());
        };
        match self.chain_id()? {
            id if id == expected => Ok(()),
            id => Err(ChainError::Contract(format!(
                "the endpoint serves chain {id}, not chain {expected}"
            ))),
        }
    }

    /// `e` as text, the endpoint's path and query cut out.
    pub fn describe(&self, e: &ChainError) -> String {
        let text = e.to_string();
        let full = self.url.as_str();
        let bare = full.trim_end_matches('/');
        text.replace(full, &self.url_shown)
            .replace(bare, &self.url_shown)
    }

    pub fn from(&self) -> Address {
        self.from
    }

    pub fn to(&self) -> Address {
        self.to
    }

    /// The AgentKeysAudit contract anchors call, if any.
    pub fn contract(&self) -> Option<Address> {
        self.contract
    }

    /// Sends a transaction carrying `data` (hex, no `0x`) to the anchor's
    /// recipient at the chain's current EIP-1559 fees; with `replacing`, in
    /// that transaction's place (its nonce and gas limit) with fees above
    /// its by the eighth nodes require. Never above the fee ceiling.
    pub fn send(&self, data: &str, replacing: Option<&PendingTx>) -> Result<TxHash, ChainError> {
        let input =
            hex::decode(data).map_err(|_| ChainError::Contract("anchor data is not hex".into()))?;
        let mut tx = TransactionRequest::default()
            .with_from(self.from)
            .with_to(self.to)
            .with_input(input);
        let (provider, ceiling) = (&self.provider, self.fee_ceiling);
        self.runtime.run(async move {
            let fees = provider
                .estimate_eip1559_fees()
                .await
                .map_err(rpc("eth_feeHistory"))?;
            let (mut max_fee, mut tip) = (fees.max_fee_per_gas, fees.max_priority_fee_per_gas);
            if let Some(old) = replacing {
                let outbid = |fee: u128| fee + fee / 8 + 1;
                max_fee = max_fee.max(outbid(old.max_fee_per_gas));
                tip = tip.max(outbid(old.max_priority_fee_per_gas));
                // Its gas too: an estimate now would run after it, where
                // the contract refuses the same range again.
                tx.set_nonce(old.nonce);
                tx.set_gas_limit(old.gas_limit);
            }
            if let Some(ceiling) = ceiling.filter(|ceiling| max_fee > *ceiling) {
                return Err(ChainError::FeeCeiling {
                    wanted: max_fee,
                    ceiling,
                });
            }
            tx.set_max_fee_per_gas(max_fee);
            tx.set_max_priority_fee_per_gas(tip.min(max_fee));
            let sent = provider.send_transaction(tx).await.map_err(refused)?;
            Ok(*sent.tx_hash())
        })
    }

    /// Transaction `tx` (hex) as mined in the canonical chain; an error
    /// when it is not a hash, or not (or no longer) mined.
    pub fn mined(&self, tx: &str) -> Result<MinedTx, ChainError> {
        let not_mined = |why: &str| ChainError::Contract(format!("transaction {tx} {why}"));
        let hash = tx
            .parse()
            .map_err(|_| not_mined("is not a transaction hash"))?;
        match self.find(hash)? {
            TxState::Mined(mined) => Ok(mined),
            TxState::Pending(_) | TxState::Unknown => Err(not_mined("is not mined on this chain")),
        }
    }

    /// Where `tx` stands: unknown, pending, or mined in a block that is
    /// still the chain's at its height, and how deep.
    pub fn find(&self, tx: TxHash) -> Result<TxState, ChainError> {
        let provider = &self.provider;
        self.runtime.run(async move {
            let found = provider
                .get_transaction_by_hash(tx)
                .await
                .map_err(rpc("eth_getTransactionByHash"))?;
            let Some(found) = found else {
                return Ok(TxState::Unknown);
            };
            let pending = TxState::Pending(PendingTx {
                nonce: found.nonce(),
                gas_limit: found.gas_limit(),
                max_fee_per_gas: alloy::consensus::Transaction::max_fee_per_gas(&found),
                max_priority_fee_per_gas: found.max_priority_fee_per_gas().unwrap_or(0),
            });
            let (Some(block), Some(block_hash)) = (found.block_number, found.block_hash) else {
                return Ok(pending);
            };
            let receipt = provider
                .get_transaction_receipt(tx)
                .await
                .map_err(rpc("eth_getTransactionReceipt"))?;
            let canonical = provider
                .get_block_by_number(BlockNumberOrTag::Number(block))
                .await
                .map_err(rpc("eth_getBlockByNumber"))?
                .map(|b| b.header.hash);
            let receipt = match receipt {
                Some(r) if r.block_hash == Some(block_hash) && canonical == Some(block_hash) => r,
                // Its block is being replaced: look again later.
                _ => return Ok(pending),
            };
            let latest = provider
                .get_block_number()
                .await
                .map_err(rpc("eth_blockNumber"))?;
            Ok(TxState::Mined(MinedTx {
                block,
                block_hash,
                depth: (latest + 1).saturating_sub(block),
                succeeded: receipt.status(),
                from: found.from(),
                to: found.to(),
                input: found.input().clone(),
                gas_used: receipt.gas_used,
            }))
        })
    }

    /// The contract's `lastSeq()`: the last record it holds an anchor of;
    /// `None` without a contract.
    pub fn last_seq(&self) -> Result<Option<u64>, ChainError> {
        let Some(contract) = self.contract else {
            return Ok(None);
        };
        let call = TransactionRequest::default()
            .with_to(contract)
            .with_input(lastSeqCall {}.abi_encode());
        let provider = &self.provider;
        let answer = self
            .runtime
            // Mined state only: a node's pending state counts anchors
            // still waiting in its pool, which the logs do not have yet.
            .run(async move { provider.call(call).latest().await })
            .map_err(rpc("eth_call lastSeq()"))?;
        lastSeqCall::abi_decode_returns(&answer)
            .map(Some)
            .map_err(|_| ChainError::Contract(format!("{contract}: lastSeq() is not a number")))
    }

    /// The contract's anchor that starts at `from_seq`, as its `Anchored`
    /// event says (looked for from block `since` on): range, root, format
    /// and transaction.
    pub fn anchored_from(&self, from_seq: u64, since: u64) -> Result<Anchor, ChainError> {
        let contract = self
            .contract
            .ok_or_else(|| ChainError::Contract("no contract".into()))?;
        let filter = Filter::new()
            .address(contract)
            .event_signature(Anchored::SIGNATURE_HASH)
            .topic1(B256::from(U256::from(from_seq)))
            .from_block(self.start_block.max(since));
        let provider = &self.provider;
        let logs = self
            .runtime
            .run(async move { provider.get_logs(&filter).await })
            .map_err(rpc("eth_getLogs"))?;
        let log = logs.first().ok_or_else(|| {
            ChainError::Contract(format!("the contract holds no anchor from {from_seq}"))
        })?;
        let event = log.log_decode::<Anchored>().map_err(|_| {
            ChainError::Contract(format!(
                "the contract's anchor from {from_seq} is not an Anchored event"
            ))
        })?;
        let event = &event.inner.data;
        Ok(Anchor {
            version: event.version,
            from_seq,
            to_seq: event.toSeq,
            root: hex::encode(event.root),
            tx_hash: log.transaction_hash.map(|h| h.to_string()),
            contract: Some(contract.to_string().to_lowercase()),
            block: None,
            block_hash: None,
            gas_used: None,
            ts: 0,
        })
    }

    /// The chain the endpoint serves.
    pub fn chain_id(&self) -> Result<u64, ChainError> {
        let provider = &self.provider;
        self.runtime
            .run(async move { provider.get_chain_id().await })
            .map_err(rpc("eth_chainId"))
    }

    /// The code at `address` as of `block`.
    pub fn code_at(&self, address: Address, block: u64) -> Result<Bytes, ChainError> {
        let provider = &self.provider;
        self.runtime
            .run(async move {
                provider
                    .get_code_at(address)
                    .block_id(BlockId::number(block))
                    .await
            })
            .map_err(rpc("eth_getCode"))
    }
}

fn rpc(call: &'static str) -> impl FnOnce(TransportError) -> ChainError {
    move |source| ChainError::Rpc { call, source }
}

/// A failed send, in the contract's words when it refused the anchor
/// (the gas estimate runs the call first).
fn refused(source: TransportError) -> ChainError {
    let reason = source
        .as_error_resp()
        .and_then(|e| e.as_decoded_interface_error::<AgentKeysAudit::AgentKeysAuditErrors>());
    match reason {
        Some(reason) => {
            ChainError::Contract(format!("the contract refuses the anchor: {reason:?}"))
        }
        None => ChainError::Rpc {
            call: "sending the anchor",
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calldata the sink sends through alloy's ABI encoder is the one
    /// `Anchor::chain_data` (and so `verify` and the proofs) expects.
    #[test]
    fn the_contract_call_is_the_anchors_chain_data() {
        let anchor = Anchor {
            version: 1,
            from_seq: 5,
            to_seq: 0x1_0000_0001,
            root: "ab".repeat(32),
            tx_hash: None,
            contract: Some("0x00000000000000000000000000000000000000aa".into()),
            block: None,
            block_hash: None,
            gas_used: None,
            ts: 0,
        };
        let call = anchorCall {
            fromSeq: 5,
            toSeq: 0x1_0000_0001,
            root: B256::from([0xab; 32]),
            version: 1,
        };
        assert_eq!(anchor.chain_data().unwrap(), hex::encode(call.abi_encode()));
        assert_eq!(
            hex::encode(Anchored::SIGNATURE_HASH),
            super::super::ANCHORED_TOPIC
        );
    }

    #[test]
    fn a_transaction_is_an_anchor_only_from_the_sender_to_the_recipient_with_the_data() {
        let (from, to) = (Address::repeat_byte(1), Address::repeat_byte(2));
        let mined = MinedTx {
            block: 7,
            block_hash: B256::ZERO,
            depth: 1,
            succeeded: true,
            from,
            to: Some(to),
            input: Bytes::from(vec![0xab, 0xcd]),
            gas_used: 21_000,
        };
        let went = |e: String| e.contains("went from");
        assert_eq!(mined.carries(from, Some(to), "ABCD"), Ok(()));
        assert_eq!(mined.carries(from, None, "abcd"), Ok(()), "any recipient");
        assert!(went(mined.carries(to, None, "abcd").unwrap_err()));
        assert!(went(mined.carries(from, Some(from), "abcd").unwrap_err()));
        let other = mined.carries(from, None, "abce").unwrap_err();
        assert!(other.contains("another anchor"), "{other}");
        let reverted = MinedTx {
            succeeded: false,
            ..mined
        };
        let failed = reverted.carries(from, Some(to), "abcd").unwrap_err();
        assert!(failed.contains("did not succeed"), "{failed}");
    }

    /// A provider's key in its URL never reaches an error's text.
    #[test]
    fn errors_show_the_endpoint_without_its_path_or_query() {
        let url = "https://rpc.example.net/v3/secret-key?token=also-secret";
        assert_eq!(shown(url), "https://rpc.example.net/…");
        let chain = AnchorChain::connect(url, Address::ZERO, None, None, None, 0).unwrap();
        let error = ChainError::Contract(format!("error sending request for url ({url})"));
        let described = chain.describe(&error);
        assert!(!described.contains("secret"), "{described}");
        assert!(
            described.contains("https://rpc.example.net/…"),
            "{described}"
        );
        let bad = AnchorChain::connect("not a url/secret", Address::ZERO, None, None, None, 0);
        assert!(!bad.err().unwrap().to_string().contains("secret"));
    }
}
