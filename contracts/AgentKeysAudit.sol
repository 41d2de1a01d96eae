// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @title Anchors of an agentkeys-broker audit ledger
/// @notice One event per anchored batch: the Merkle root of the records
/// `fromSeq..=toSeq` (in the tree format `version`), chained to the root
/// anchored before it. Only accounts the owner allows may anchor.
contract AgentKeysAudit {
    address public immutable owner;
    mapping(address => bool) public anchorers;
    /// The root of the latest anchor, and the last record it covers.
    bytes32 public lastRoot;
    uint64 public lastSeq;

    event Anchored(uint64 indexed fromSeq, uint64 toSeq, bytes32 root, bytes32 prevRoot, uint8 version);
    event AnchorerSet(address indexed anchorer, bool allowed);

    error NotOwner();
    error NotAnchorer();
    error EmptyRange();

    constructor(address anchorer) {
        owner = msg.sender;
        anchorers[anchorer] = true;
        emit AnchorerSet(anchorer, true);
    }

    /// @notice Allows or stops an account that anchors (a broker's key).
    function setAnchorer(address anchorer, bool allowed) external {
        if (msg.sender != owner) revert NotOwner();
        anchorers[anchorer] = allowed;
        emit AnchorerSet(anchorer, allowed);
    }

    /// @notice Anchors the records `fromSeq..=toSeq` under `root`.
    function anchor(uint64 fromSeq, uint64 toSeq, bytes32 root, uint8 version) external {
        if (!anchorers[msg.sender]) revert NotAnchorer();
        if (toSeq < fromSeq) revert EmptyRange();
        emit Anchored(fromSeq, toSeq, root, lastRoot, version);
        lastRoot = root;
        lastSeq = toSeq;
    }
}
