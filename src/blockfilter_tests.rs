use bitcoin::consensus::encode::deserialize_hex;
use serde_json::Value;

use super::*;

struct Captured {
    hash: BlockHash,
    block: Block,
    spent: Vec<ScriptBuf>,
    filter: String,
    header: String,
    previous: FilterHeader,
}

fn fixture() -> Value {
    serde_json::from_str(include_str!("../tests/fixtures/bip158/getblockfilter.json"))
        .expect("fixture is JSON")
}

fn captured() -> Vec<Captured> {
    let f = fixture();
    f["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .map(|b| Captured {
            hash: b["hash"].as_str().unwrap().parse().unwrap(),
            block: deserialize_hex(b["block"].as_str().unwrap()).unwrap(),
            spent: b["prevout_scripts"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|tx| tx.as_array().unwrap().iter())
                .map(|s| ScriptBuf::from_hex(s.as_str().unwrap()).unwrap())
                .collect(),
            filter: b["getblockfilter"]["filter"].as_str().unwrap().into(),
            header: b["getblockfilter"]["header"].as_str().unwrap().into(),
            previous: b["previous_header"].as_str().unwrap().parse().unwrap(),
        })
        .collect()
}

fn address_script(name: &str) -> ScriptBuf {
    let text = fixture()["addresses"][name].as_str().unwrap().to_string();
    text.parse::<bitcoin::Address<_>>()
        .unwrap()
        .require_network(bitcoin::Network::Regtest)
        .unwrap()
        .script_pubkey()
}

fn checked(c: &Captured) -> CheckedFilter {
    CheckedFilter::from_hex(&c.filter, &c.header).expect("Core's filter passes the checks")
}

#[test]
fn the_filters_built_here_are_bitcoin_core_s_byte_for_byte() {
    for c in captured() {
        let built = basic_filter(&c.block, c.spent.iter().map(|s| s.as_script()));
        assert_eq!(
            hex::encode(&built),
            c.filter,
            "the basic filter of block {} differs from Core's",
            c.hash
        );
        assert_eq!(
            header_of(&built, &c.previous).to_string(),
            c.header,
            "the filter header of block {} differs from Core's",
            c.hash
        );
    }
}

#[test]
fn core_s_filters_chain_through_their_headers() {
    let blocks = captured();
    for c in &blocks {
        assert!(
            checked(c).follows(&c.previous),
            "block {}'s filter does not follow its previous header",
            c.hash
        );
    }
    for pair in blocks.windows(2) {
        assert_eq!(pair[1].previous, checked(&pair[0]).header);
        assert!(
            !checked(&pair[1]).follows(&checked(&pair[1]).header),
            "a filter must not follow a header other than its previous one"
        );
    }
}

#[test]
fn a_block_paying_or_spending_a_script_may_hold_it_and_others_do_not() {
    let blocks = captured();
    let (b102, b103, b104) = (&blocks[1], &blocks[2], &blocks[3]);
    for name in ["taproot", "legacy", "p2sh_segwit"] {
        let script = address_script(name);
        assert!(
            checked(b102).may_hold(&b102.hash, std::slice::from_ref(&script)),
            "block 102 pays the {name} address: its filter must say so"
        );
        assert!(
            !checked(b104).may_hold(&b104.hash, &[script]),
            "block 104 holds only a coinbase to the miner; the {name} address is not in it"
        );
    }
    for name in ["legacy", "p2sh_segwit"] {
        assert!(
            checked(b103).may_hold(&b103.hash, &[address_script(name)]),
            "block 103 spends the {name} coin: its script is in the filter as a spent one"
        );
    }
    assert!(
        !checked(b103).may_hold(&b103.hash, &[address_script("taproot")]),
        "block 103 neither pays nor spends the taproot address"
    );
    let op_return = ScriptBuf::from_hex("6a0a636861696e7761746368").unwrap();
    assert!(
        !checked(b102).may_hold(&b102.hash, &[op_return]),
        "an OP_RETURN output is not in a basic filter"
    );
    let strangers: Vec<ScriptBuf> = (0u8..50)
        .map(|i| ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array([i; 20])))
        .collect();
    assert!(
        !checked(b102).may_hold(&b102.hash, &strangers),
        "fifty unrelated scripts all miss block 102's filter"
    );
}

#[test]
fn a_filter_read_under_another_block_s_hash_is_not_a_proof() {
    let blocks = captured();
    let legacy = address_script("legacy");
    // The filter's keys come from its block's hash: under another hash, it says random things.
    let misses = blocks
        .iter()
        .filter(|other| other.hash != blocks[1].hash)
        .filter(|other| !checked(&blocks[1]).may_hold(&other.hash, std::slice::from_ref(&legacy)))
        .count();
    assert_eq!(
        misses, 3,
        "under other hashes the filter misses the legacy script"
    );
}

#[test]
fn forged_filters_are_refused_before_any_matching() {
    let zero = "00".repeat(32);
    let too_many = CheckedFilter::from_hex("fdffff00", &zero);
    assert_eq!(
        too_many,
        Err(FilterError::CountTooLarge {
            claimed: 0xffff,
            bytes: 4,
            fits: 0
        }),
        "65,535 elements cannot fit in one byte"
    );
    // 2^60 elements would overflow the matcher's range (count × M).
    let overflow = format!("ff{}", hex::encode((1u64 << 60).to_le_bytes()));
    assert!(matches!(
        CheckedFilter::from_hex(&overflow, &zero),
        Err(FilterError::CountTooLarge { .. })
    ));
    assert_eq!(
        CheckedFilter::from_hex("", &zero),
        Err(FilterError::NoCount),
        "an empty filter has no count; read as none it would hide every block"
    );
    assert_eq!(
        CheckedFilter::from_hex("zz", &zero),
        Err(FilterError::NotHex)
    );
    assert_eq!(
        CheckedFilter::from_hex("00", "abcd"),
        Err(FilterError::BadHeader)
    );
    let huge = "00".repeat(MAX_FILTER_BYTES + 1);
    assert_eq!(
        CheckedFilter::from_hex(&huge, &zero),
        Err(FilterError::TooLarge(MAX_FILTER_BYTES + 1))
    );
}

#[test]
fn a_filter_cut_short_says_may_hold() {
    let blocks = captured();
    let b102 = &blocks[1];
    let strangers: Vec<ScriptBuf> = (0u8..50)
        .map(|i| ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array([i; 20])))
        .collect();
    assert!(!checked(b102).may_hold(&b102.hash, &strangers));
    // Its last byte gone, the filter still has room for its eight elements at their shortest,
    // so it passes the count check; but the reader runs out before the last one. (Fifty
    // queries reach past the last element, so it must be read; a query below it would stop
    // earlier and could still be answered.)
    let cut = &b102.filter[..b102.filter.len() - 2];
    let cut = CheckedFilter::from_hex(cut, &b102.header).expect("passes the count check");
    assert!(
        cut.may_hold(&b102.hash, &strangers),
        "a filter that ends before its last element cannot prove absence"
    );
}

#[test]
fn an_empty_block_filter_holds_nothing() {
    let zero = "00".repeat(32);
    let empty = CheckedFilter::from_hex("00", &zero).expect("no elements is a valid filter");
    let script = address_script("legacy");
    assert!(!empty.may_hold(&BlockHash::all_zeros(), &[script]));
}
