use super::hashing::{hash_block, hash_encoding, tx_hashes, SharedHashing};
use super::layout::encoded;
use super::*;
use bitcoin::consensus::{deserialize, serialize};
use bitcoin::hashes::Hash;
use bitcoin::Wtxid;
use bitcoin::{ScriptBuf, TxOut};

fn mainnet_block() -> Block {
    let raw = include_bytes!(
        "../../benches/data/block_000000000000000000000c835b2adcaedc20fdf6ee440009c249452c726dafae.raw"
    );
    deserialize(raw).expect("the fixture is a block")
}

fn hash(b: &Block) -> BlockHash {
    b.block_hash()
}

#[test]
fn a_real_block_passes() {
    let b = mainnet_block();
    assert_eq!(
        hash(&b).to_string(),
        "000000000000000000000c835b2adcaedc20fdf6ee440009c249452c726dafae"
    );
    assert_eq!(
        check_block(&b, hash(&b)),
        Ok(()),
        "the real block proves itself"
    );
}

#[test]
fn another_hash_is_refused() {
    let b = mainnet_block();
    let other = BlockHash::all_zeros();
    assert!(matches!(
        check_block(&b, other),
        Err(ProofError::WrongBlock { .. })
    ));
}

#[test]
fn an_altered_output_under_the_real_header_is_refused() {
    let mut b = mainnet_block();
    let real = hash(&b);
    b.txdata[1].output[0].value = Amount::from_int_btc(10_000);
    assert_eq!(hash(&b), real, "the header is untouched");
    assert_eq!(check_block(&b, real), Err(ProofError::MerkleRoot));
    b.txdata[1].output[0].value = Amount::MAX_MONEY;
    assert!(
        matches!(check_block(&b, real), Err(ProofError::TotalValue(_))),
        "21M BTC plus the rest is refused before the merkle root is even computed"
    );
}

#[test]
fn a_duplicated_tail_is_refused_though_its_merkle_root_matches() {
    let mut b = mainnet_block();
    // CVE-2012-2459: with an odd count, repeating the last transaction keeps the root.
    if b.txdata.len().is_multiple_of(2) {
        b.txdata.pop();
        b.header.merkle_root = b.compute_merkle_root().unwrap();
    }
    let expected = hash(&b);
    let last = b.txdata.last().unwrap().clone();
    b.txdata.push(last.clone());
    assert!(b.check_merkle_root(), "the mutation keeps the merkle root");
    assert_eq!(
        check_block(&b, expected),
        Err(ProofError::Duplicate(last.compute_txid()))
    );
}

#[test]
fn an_altered_witness_is_refused() {
    let mut b = mainnet_block();
    let real = hash(&b);
    let tx = b
        .txdata
        .iter_mut()
        .skip(1)
        .find(|t| t.input.iter().any(|i| !i.witness.is_empty()))
        .expect("the block has segwit spends");
    let input = tx.input.iter_mut().find(|i| !i.witness.is_empty()).unwrap();
    input.witness.push([0u8; 3]);
    assert_eq!(check_block(&b, real), Err(ProofError::WitnessCommitment));
}

fn hashes_of(b: &Block) -> (Vec<Txid>, Vec<Option<Wtxid>>) {
    let (bytes, spans) = encoded(b);
    tx_hashes(&bytes, &spans)
}

#[test]
fn one_encoding_gives_the_txids_and_wtxids_rust_bitcoin_computes() {
    let block = mainnet_block();
    let (txids, wtxids) = hashes_of(&block);
    let mut witnessed = 0;
    for ((tx, txid), wtxid) in block.txdata.iter().zip(txids).zip(wtxids) {
        assert_eq!(txid, tx.compute_txid(), "txid");
        match wtxid {
            Some(w) => {
                witnessed += 1;
                assert_eq!(w, tx.compute_wtxid(), "wtxid of {txid}");
            }
            None => assert_eq!(tx.compute_wtxid().to_raw_hash(), txid.to_raw_hash()),
        }
    }
    assert_eq!(witnessed, 2065, "the block's transactions with a witness");
    // No inputs: rust-bitcoin encodes it with the segwit marker, which the txid leaves out.
    let mut b = block.clone();
    b.txdata[1].input.clear();
    let bare = &b.txdata[1];
    assert_ne!(serialize(bare).len(), bare.base_size(), "segwit layout");
    let (txids, wtxids) = hashes_of(&b);
    assert_eq!((txids[1], wtxids[1]), (bare.compute_txid(), None));
}

fn mainnet_raw() -> &'static [u8] {
    include_bytes!(
        "../../benches/data/block_000000000000000000000c835b2adcaedc20fdf6ee440009c249452c726dafae.raw"
    )
}

/// The mainnet block cut to its first `n` transactions, its witness commitment and merkle
/// root made again: a valid block body the size of a regtest one.
fn cut_block(n: usize) -> Block {
    let mut b = mainnet_block();
    b.txdata.truncate(n);
    remade(b)
}

/// `b` with its witness commitment and merkle root made again for its transactions.
fn remade(mut b: Block) -> Block {
    let reserved = b.txdata[0].input[0].witness.nth(0).unwrap().to_vec();
    let root = b.witness_root().unwrap();
    let commitment = Block::compute_witness_commitment(&root, &reserved);
    let out = b.txdata[0]
        .output
        .iter_mut()
        .rev()
        .find(|o| {
            o.script_pubkey
                .as_bytes()
                .starts_with(&[0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed])
        })
        .unwrap();
    let mut script = out.script_pubkey.to_bytes();
    script[6..38].copy_from_slice(commitment.as_byte_array());
    out.script_pubkey = ScriptBuf::from(script);
    b.header.merkle_root = b.compute_merkle_root().unwrap();
    assert!(
        b.check_witness_commitment() && b.check_merkle_root(),
        "the remade block is valid"
    );
    b
}

#[test]
fn blocks_decoded_from_their_bytes_are_proven_on_one_thread_or_two() {
    let big = mainnet_raw();
    let small = serialize(&cut_block(40));
    assert!(
        big.len() >= 64 * 1024 && small.len() < 64 * 1024,
        "one of each path"
    );
    for raw in [big, &small[..]] {
        let want: Block = deserialize(raw).unwrap();
        let got = decode_block(raw, want.block_hash());
        assert_eq!(
            got.as_ref(),
            Ok(&want),
            "a real block of {} bytes",
            raw.len()
        );
        assert!(matches!(
            decode_block(raw, BlockHash::all_zeros()),
            Err(ProofError::WrongBlock { .. })
        ));
    }
}

/// A byte changed in an output, in a witness, or cut off or added at the end: the same
/// refusals `check_block` gives for the decoded block.
#[test]
fn tampered_bytes_are_refused_whichever_path_hashes_them() {
    for block in [mainnet_block(), cut_block(40)] {
        let raw = serialize(&block);
        let hash = block.block_hash();
        let (_, spans) = encoded(&block);
        let header = raw.len() - spans.iter().map(|s| s.len).sum::<usize>();
        let segwit = spans.iter().position(|s| s.witness).unwrap();
        let s = &spans[segwit];
        let at = |offset: usize| header + s.start + offset;
        // The last byte of the lock time's preceding output script, and the middle of
        // the witness.
        for (what, i, want) in [
            ("an output byte", at(s.base + 2 - 5), ProofError::MerkleRoot),
            (
                "a witness byte",
                at(s.len - 4 - 1),
                ProofError::WitnessCommitment,
            ),
        ] {
            let mut forged = raw.clone();
            forged[i] ^= 0x01;
            assert_eq!(
                decode_block(&forged, hash),
                Err(want.clone()),
                "{what} changed, {} bytes",
                raw.len()
            );
        }
        for forged in [&raw[..raw.len() - 1], &[raw.as_slice(), &[0]].concat()[..]] {
            assert!(
                matches!(decode_block(forged, hash), Err(ProofError::Undecodable(_))),
                "a block of {} bytes cut or lengthened by one",
                raw.len()
            );
        }
    }
}

#[test]
fn the_scan_finds_the_bounds_the_decoder_read() {
    let block = mainnet_block();
    let raw = mainnet_raw();
    let scanned = scan_spans(raw).expect("the scan reads a real block");
    let (_, encoded) = encoded(&block);
    let header = raw.len() - encoded.iter().map(|s| s.len).sum::<usize>();
    assert_eq!(scanned.len(), encoded.len(), "as many transactions");
    for (a, b) in scanned.iter().zip(&encoded) {
        assert_eq!(
            (a.start, a.len, a.base, a.witness),
            (b.start + header, b.len, b.base, b.witness),
            "bounds of a transaction"
        );
    }
    assert_eq!(scanned, decoded_spans(&block), "the decoder's bounds");
    assert_eq!(scan_spans(&raw[..raw.len() - 1]), None, "cut short");
    assert_eq!(
        scan_spans(&raw[..100]),
        None,
        "cut in the first transaction"
    );
}

fn tx_paying(values: &[u64]) -> Transaction {
    let mut tx = mainnet_block().txdata[1].clone();
    tx.output = values
        .iter()
        .map(|v| TxOut {
            value: Amount::from_sat(*v),
            script_pubkey: ScriptBuf::new(),
        })
        .collect();
    tx
}

#[test]
fn the_witness_check_agrees_with_rust_bitcoins_on_every_tampering() {
    let real = mainnet_block();
    let mut cases: Vec<(&str, Block)> = vec![("the real block", real.clone())];
    let mut b = real.clone();
    let plain = b
        .txdata
        .iter()
        .position(|t| !t.is_coinbase() && t.input.iter().all(|i| i.witness.is_empty()));
    let plain = plain.expect("the block has a transaction without witness");
    b.txdata[plain].input[0].witness.push([1u8; 2]);
    cases.push((
        "a witness given to a transaction without one (same txid)",
        b,
    ));
    let mut b = real.clone();
    b.txdata[0].output.retain(|o| {
        !o.script_pubkey
            .as_bytes()
            .starts_with(&[0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed])
    });
    cases.push(("the commitment output removed", b));
    let mut b = real.clone();
    b.txdata[0].input[0].witness = bitcoin::Witness::from_slice(&[[0u8; 31]]);
    cases.push(("a reserved value of 31 bytes", b));
    let mut b = real.clone();
    b.txdata[0].input[0].witness.push([0u8; 32]);
    cases.push(("two reserved values", b));
    for (what, b) in cases {
        let ours = witness_commitment_holds(&b, hash_encoding(&b).witness_root);
        assert_eq!(ours, b.check_witness_commitment(), "{what}");
        assert_eq!(ours, what == "the real block", "{what}");
    }
}

#[test]
fn amounts_beyond_the_supply_are_refused() {
    let max = Amount::MAX_MONEY.to_sat();
    let ok = tx_paying(&[max]);
    assert_eq!(
        check_amounts(&ok, ok.compute_txid()),
        Ok(()),
        "21M BTC is the ceiling"
    );
    let over = tx_paying(&[max + 1]);
    assert!(matches!(
        check_amounts(&over, over.compute_txid()),
        Err(ProofError::OutputValue { vout: 0, .. })
    ));
    let sum = tx_paying(&[max, 1]);
    assert!(matches!(
        check_amounts(&sum, sum.compute_txid()),
        Err(ProofError::TotalValue(_))
    ));
    let wrap = tx_paying(&[u64::MAX, u64::MAX]);
    assert!(
        check_amounts(&wrap, wrap.compute_txid()).is_err(),
        "no overflow"
    );
}

#[test]
fn a_transaction_must_be_the_one_asked_for() {
    let tx = tx_paying(&[1000]);
    let other = tx_paying(&[2000]);
    assert!(matches!(
        check_transaction(&tx, other.compute_txid()),
        Err(ProofError::WrongTransaction { .. })
    ));
    assert_eq!(check_transaction(&tx, tx.compute_txid()), Ok(()));
}

/// However the chunks fall between the two threads, and whichever of them computes the roots,
/// the result is what one thread computes alone.
#[test]
fn shared_hashing_gives_what_one_thread_gives_however_the_work_falls() {
    let raw = mainnet_raw();
    let spans = scan_spans(raw).unwrap();
    let alone = hash_block(raw, &spans);
    let one = SharedHashing::default();
    one.work(raw, &spans);
    one.txids_if_hashed(&spans);
    assert_eq!(
        one.finish(&spans),
        alone,
        "one thread took every chunk and both roots"
    );
    let late = SharedHashing::default();
    late.txids_if_hashed(&spans);
    late.work(raw, &spans);
    assert_eq!(
        late.finish(&spans),
        alone,
        "the txid root asked for before any chunk"
    );
    for round in 0..20 {
        let shared = SharedHashing::default();
        std::thread::scope(|s| {
            s.spawn(|| shared.work(raw, &spans));
            shared.work(raw, &spans);
            shared.txids_if_hashed(&spans);
        });
        assert_eq!(shared.finish(&spans), alone, "two threads, round {round}");
    }
}

/// A second thread that read other bounds (here: another block's) hashes other messages;
/// neither thread hangs or panics, and decode_block does not use what they shared.
#[test]
fn a_thread_that_read_other_bounds_neither_hangs_nor_panics() {
    let raw = mainnet_raw();
    let spans = scan_spans(raw).unwrap();
    let other = serialize(&cut_block(40));
    let other_spans = scan_spans(&other).unwrap();
    for (first, second) in [(&other_spans, &spans), (&spans, &other_spans)] {
        let shared = SharedHashing::default();
        std::thread::scope(|s| {
            s.spawn(|| shared.work(raw, first));
            shared.work(raw, second);
            shared.txids_if_hashed(second);
        });
    }
}

/// The encodings rust-bitcoin refuses, which is what makes a decoded block's bounds the true
/// bounds of its bytes: a non-minimal count, a segwit flag other than 1, a flag on a
/// transaction whose inputs have no witness.
#[test]
fn encodings_that_would_not_read_back_are_refused() {
    let block = cut_block(40);
    let raw = serialize(&block);
    let hash = block.block_hash();
    let spans = decoded_spans(&block);
    assert_eq!(raw[80], 40, "the transaction count, one byte");
    let long_count = [&raw[..80], &[0xfd, 40, 0][..], &raw[81..]].concat();
    let segwit = spans.iter().skip(1).find(|s| s.witness).unwrap();
    let mut flag_two = raw.clone();
    flag_two[segwit.start + 5] = 2;
    // The same transaction with the segwit flag but every witness empty.
    let tx = &raw[segwit.start..segwit.start + segwit.len];
    let inputs = block.txdata[spans.iter().position(|s| s == segwit).unwrap()]
        .input
        .len();
    let empty_witnesses = [
        &tx[..6],
        &tx[6..segwit.base - 2],
        &vec![0u8; inputs][..],
        &tx[tx.len() - 4..],
    ]
    .concat();
    let flag_alone = [
        &raw[..segwit.start],
        &empty_witnesses[..],
        &raw[segwit.start + segwit.len..],
    ]
    .concat();
    for (what, bytes) in [
        ("a count of three bytes where one does", long_count),
        ("segwit flag 2", flag_two),
        ("a segwit flag without witnesses", flag_alone),
    ] {
        assert!(
            matches!(decode_block(&bytes, hash), Err(ProofError::Undecodable(_))),
            "{what}: {:?}",
            decode_block(&bytes, hash).map(|b| b.block_hash())
        );
    }
}

/// A body under another header is refused before it is decoded: garbage after the right
/// header of another block costs one hash. Nothing larger than a block is read.
#[test]
fn the_header_and_the_size_are_checked_before_anything_else() {
    let raw = mainnet_raw();
    let hash = mainnet_block().block_hash();
    let garbage = [&raw[..80], &vec![0xff; 1000][..]].concat();
    assert!(matches!(
        decode_block(&garbage, BlockHash::all_zeros()),
        Err(ProofError::WrongBlock { .. })
    ));
    assert!(matches!(
        decode_block(&garbage, hash),
        Err(ProofError::Undecodable(_))
    ));
    assert!(matches!(
        decode_block(&raw[..79], hash),
        Err(ProofError::Undecodable(_))
    ));
    let huge = [raw, &vec![0u8; MAX_BLOCK_SIZE][..]].concat();
    assert_eq!(
        decode_block(&huge, hash),
        Err(ProofError::TooLarge(huge.len()))
    );
}

/// If the bytes ever scanned otherwise than they decode, the block's own encoding is hashed:
/// the real block still passes, and a block whose bytes were altered still fails.
#[test]
fn bounds_read_two_ways_fall_back_to_the_encoding() {
    let block = mainnet_block();
    let spans = decoded_spans(&block);
    let hashed = hashes_of_what_was_decoded(&block, &spans, None, SharedHashing::default());
    assert_eq!(check_hashed_body(&block, &hashed), Ok(()), "the real block");
    let mut wrong = scan_spans(mainnet_raw()).unwrap();
    wrong[3].base += 1;
    let hashed = hashes_of_what_was_decoded(&block, &spans, Some(wrong), SharedHashing::default());
    assert_eq!(
        check_hashed_body(&block, &hashed),
        Ok(()),
        "a scan one byte off"
    );
    let mut altered = block.clone();
    altered.txdata[5].output[0].value = Amount::from_sat(1);
    let hashed = hashes_of_what_was_decoded(&altered, &spans, None, SharedHashing::default());
    assert_eq!(
        check_hashed_body(&altered, &hashed),
        Err(ProofError::MerkleRoot)
    );
}

/// A relayed body is proven before the node names its hash, so a transaction of 64 bytes
/// (which could pose as an inner merkle node) is refused there; under the hash the node
/// named, the same block is the node's and passes.
#[test]
fn a_relayed_block_with_a_64_byte_transaction_is_refused() {
    use bitcoin::{absolute::LockTime, transaction::Version, OutPoint, Sequence, TxIn};
    let mut b = cut_block(40);
    let sixty_four = Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::new(b.txdata[1].compute_txid(), 0),
            script_sig: ScriptBuf::new(),
            sequence: Sequence::MAX,
            witness: bitcoin::Witness::new(),
        }],
        output: vec![TxOut {
            value: Amount::from_sat(1000),
            script_pubkey: ScriptBuf::from(vec![0x51; 4]),
        }],
    };
    assert_eq!(sixty_four.base_size(), 64, "a 64-byte transaction");
    let txid = sixty_four.compute_txid();
    b.txdata.push(sixty_four);
    let b = remade(b);
    let raw = serialize(&b);
    assert_eq!(
        decode_relayed_block(&raw),
        Err(ProofError::SixtyFourBytes(txid))
    );
    assert_eq!(
        decode_block(&raw, b.block_hash()),
        Ok(b.clone()),
        "named by the node"
    );
    let relayed = decode_relayed_block(&serialize(&cut_block(40))).expect("a real body");
    assert_eq!(relayed.block(), &cut_block(40));
    let forged = {
        let mut f = cut_block(40);
        f.txdata[3].output[0].value = Amount::from_sat(7);
        serialize(&f)
    };
    assert_eq!(decode_relayed_block(&forged), Err(ProofError::MerkleRoot));
}
