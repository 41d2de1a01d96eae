// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @title Anchors of an agentkeys-broker audit ledger
/// @notice One event per anchored batch: the Merkle root of the records
/// `fromSeq..=toSeq` (in the tree format `version`), chained to the root
/// anchored before it. Batches follow each other: each starts right after
/// the last one, so no record is anchored twice or under two roots. Only
/// accounts the owner allows may anchor.
contract AgentKeysAudit {
    address public owner;
    mapping(address => bool) public anchorers;
    /// The root of the latest anchor, and the last record anchored.
    bytes32 public lastRoot;
    uint64 public lastSeq;

    event Anchored(
        uint64 indexed fromSeq, uint64 toSeq, bytes32 root, bytes32 prevRoot, uint8 version, address indexed anchorer
    );
    event AnchorerSet(address indexed anchorer, bool allowed);
    event OwnerSet(address indexed owner);

    error NotOwner();
    error NotAnchorer();
    error NotNext(uint64 expected, uint64 fromSeq);
    error EmptyRange();

    /// @param anchorer the broker's anchoring account
    /// @param startSeq the last record anchored before this contract (0 for
    /// a new ledger): the first anchor starts right after it
    constructor(address anchorer, uint64 startSeq) {
        owner = msg.sender;
        lastSeq = startSeq;
        anchorers[anchorer] = true;
        emit OwnerSet(msg.sender);
        emit AnchorerSet(anchorer, true);
    }

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner();
        _;
    }

    /// @notice Hands the contract to another owner (a key rotation).
    function setOwner(address next) external onlyOwner {
        owner = next;
        emit OwnerSet(next);
    }

    /// @notice Allows or stops an account that anchors (a broker's key).
    function setAnchorer(address anchorer, bool allowed) external onlyOwner {
        anchorers[anchorer] = allowed;
        emit AnchorerSet(anchorer, allowed);
    }

    /// @notice Anchors the records `fromSeq..=toSeq` under `root`; `fromSeq`
    /// must be the record right after the last one anchored.
    function anchor(uint64 fromSeq, uint64 toSeq, bytes32 root, uint8 version) external {
        if (!anchorers[msg.sender]) revert NotAnchorer();
        if (fromSeq != lastSeq + 1) revert NotNext(lastSeq + 1, fromSeq);
        if (toSeq < fromSeq) revert EmptyRange();
        emit Anchored(fromSeq, toSeq, root, lastRoot, version, msg.sender);
        lastRoot = root;
        lastSeq = toSeq;
    }
}
