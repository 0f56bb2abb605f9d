//! Bitcoin Core's JSON renderings of scripts, transactions and coins (`getrawtransaction` 1 and
//! 2, `getblock` 2 and 3, `gettxout`), written as Core writes them: keys in its order, amounts as
//! numbers with eight decimals, script assembly with signature hash types decoded, inferred
//! descriptors with their checksums. The simulated node answers byte for byte as the captures
//! show (tests/integration/fidelity.rs).
//!
//! Bare multisig outputs are shown as `raw(…)` descriptors of type `nonstandard`; Core names
//! them `multi(…)`. Nothing the simulated node builds has one.

use bitcoin::consensus::encode::serialize_hex;
use bitcoin::opcodes::all::{OP_CHECKSIGADD, OP_CLTV, OP_CSV, OP_PUSHNUM_1, OP_PUSHNUM_16};
use bitcoin::opcodes::Opcode;
use bitcoin::script::Instruction;
use bitcoin::{Address, Amount, Network, Script, Transaction, TxOut};
use serde_json::Value;

/// JSON written in the order it is built, with numbers written as given.
#[derive(Debug, Clone)]
pub enum Json {
    /// Already JSON text: a number, `true`, `null`, or a rendered `Value`.
    Raw(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

impl Json {
    pub fn text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            Json::Raw(s) => out.push_str(s),
            Json::Str(s) => out.push_str(&Value::from(s.as_str()).to_string()),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::from(*k).to_string());
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }

    pub fn push(&mut self, key: &'static str, value: Json) {
        if let Json::Obj(fields) = self {
            fields.push((key, value));
        }
    }
}

fn num(n: impl std::fmt::Display) -> Json {
    Json::Raw(n.to_string())
}

fn hex(bytes: &[u8]) -> Json {
    Json::Str(hex::encode(bytes))
}

/// Core's `ValueFromAmount`: always eight decimals.
pub fn amount(a: Amount) -> Json {
    let sat = a.to_sat();
    Json::Raw(format!("{}.{:08}", sat / 100_000_000, sat % 100_000_000))
}

fn signed_amount(sat: i64) -> Json {
    let sign = if sat < 0 { "-" } else { "" };
    let abs = sat.unsigned_abs();
    Json::Raw(format!(
        "{sign}{}.{:08}",
        abs / 100_000_000,
        abs % 100_000_000
    ))
}

/// A spent coin as the undo data knows it.
#[derive(Debug, Clone)]
pub struct Coin {
    pub output: TxOut,
    pub height: u32,
    pub coinbase: bool,
}

/// `ScriptToAsmStr`: pushes of up to four bytes as numbers, longer ones as hex; in a scriptSig
/// (`sighash_decode`) a push that is a strictly encoded signature ends in its hash type.
pub fn script_asm(script: &Script, sighash_decode: bool) -> String {
    let decode = sighash_decode && !script.is_op_return();
    let mut parts = Vec::new();
    for ins in script.instructions() {
        match ins {
            Err(_) => {
                parts.push("[error]".to_string());
                break;
            }
            Ok(Instruction::PushBytes(b)) if b.len() <= 4 => parts.push(script_num(b.as_bytes())),
            Ok(Instruction::PushBytes(b)) => {
                let b = b.as_bytes();
                match sighash_name(b).filter(|_| decode) {
                    Some(name) => parts.push(format!("{}[{name}]", hex::encode(&b[..b.len() - 1]))),
                    None => parts.push(hex::encode(b)),
                }
            }
            Ok(Instruction::Op(op)) => parts.push(op_name(op)),
        }
    }
    parts.join(" ")
}

/// `CScriptNum(bytes, false).getint()`: little-endian, sign in the top bit of the last byte.
fn script_num(b: &[u8]) -> String {
    if b.is_empty() {
        return "0".into();
    }
    let mut v: i64 = 0;
    for (i, byte) in b.iter().enumerate() {
        v |= (*byte as i64) << (8 * i);
    }
    let top = 0x80i64 << (8 * (b.len() - 1));
    if v & top != 0 {
        v = -(v & !top);
    }
    v.to_string()
}

fn op_name(op: Opcode) -> String {
    let code = op.to_u8();
    match op {
        _ if code == 0x4f => "-1".into(),
        _ if (OP_PUSHNUM_1.to_u8()..=OP_PUSHNUM_16.to_u8()).contains(&code) => {
            (code - OP_PUSHNUM_1.to_u8() + 1).to_string()
        }
        OP_CLTV => "OP_CHECKLOCKTIMEVERIFY".into(),
        OP_CSV => "OP_CHECKSEQUENCEVERIFY".into(),
        OP_CHECKSIGADD => "OP_CHECKSIGADD".into(),
        _ if code == 0xff => "OP_INVALIDOPCODE".into(),
        _ if code > OP_CHECKSIGADD.to_u8() => "OP_UNKNOWN".into(),
        _ => op.to_string(),
    }
}

/// The hash type a strictly DER-encoded signature ends in, named as Core names it.
fn sighash_name(sig: &[u8]) -> Option<&'static str> {
    if !strict_der(sig) {
        return None;
    }
    Some(match *sig.last()? {
        0x01 => "ALL",
        0x81 => "ALL|ANYONECANPAY",
        0x02 => "NONE",
        0x82 => "NONE|ANYONECANPAY",
        0x03 => "SINGLE",
        0x83 => "SINGLE|ANYONECANPAY",
        _ => return None,
    })
}

/// BIP 66's `IsValidSignatureEncoding` (the hash type byte included).
fn strict_der(sig: &[u8]) -> bool {
    let n = sig.len();
    if !(9..=73).contains(&n) || sig[0] != 0x30 || sig[1] as usize != n - 3 {
        return false;
    }
    let len_r = sig[3] as usize;
    if 5 + len_r >= n {
        return false;
    }
    let len_s = sig[5 + len_r] as usize;
    len_r + len_s + 7 == n
        && sig[2] == 0x02
        && len_r != 0
        && sig[4] & 0x80 == 0
        && !(len_r > 1 && sig[4] == 0 && sig[5] & 0x80 == 0)
        && sig[len_r + 4] == 0x02
        && len_s != 0
        && sig[len_r + 6] & 0x80 == 0
        && !(len_s > 1 && sig[len_r + 6] == 0 && sig[len_r + 7] & 0x80 == 0)
}

/// The key of a pay-to-pubkey script whose key has a valid size and header (`CPubKey::ValidSize`,
/// which is all `Solver` asks; the descriptor needs a point on the curve too).
fn p2pk_key(s: &Script) -> Option<&[u8]> {
    if !s.is_p2pk() {
        return None;
    }
    let key = &s.as_bytes()[1..s.len() - 1];
    let header_ok = match key.len() {
        33 => matches!(key[0], 0x02 | 0x03),
        _ => matches!(key[0], 0x04 | 0x06 | 0x07),
    };
    header_ok.then_some(key)
}

/// `Solver`'s type name, as `scriptPubKey.type` shows it.
fn script_type(s: &Script) -> &'static str {
    let witness_version = s.witness_version();
    if p2pk_key(s).is_some() {
        "pubkey"
    } else if s.is_p2pkh() {
        "pubkeyhash"
    } else if s.is_p2sh() {
        "scripthash"
    } else if s.is_p2wpkh() {
        "witness_v0_keyhash"
    } else if s.is_p2wsh() {
        "witness_v0_scripthash"
    } else if s.is_p2tr() {
        "witness_v1_taproot"
    } else if s.as_bytes() == [0x51, 0x02, 0x4e, 0x73] {
        "anchor"
    } else if witness_version.is_some_and(|v| v.to_num() != 0) {
        "witness_unknown"
    } else if s.is_op_return()
        && s.instructions().skip(1).all(|i| match i {
            // `IsPushOnly`: pushes and the small-number opcodes up to OP_16.
            Ok(Instruction::PushBytes(_)) => true,
            Ok(Instruction::Op(op)) => op.to_u8() <= OP_PUSHNUM_16.to_u8(),
            Err(_) => false,
        })
    {
        "nulldata"
    } else {
        "nonstandard"
    }
}

/// `InferDescriptor` with no key information, checksum appended.
fn descriptor(s: &Script, address: Option<&str>) -> String {
    let on_curve = p2pk_key(s).filter(|k| bitcoin::PublicKey::from_slice(k).is_ok());
    let x_only = Some(&s.as_bytes()[2.min(s.len())..])
        .filter(|_| s.is_p2tr())
        .filter(|k| bitcoin::XOnlyPublicKey::from_slice(k).is_ok());
    let body = if let Some(key) = on_curve {
        format!("pk({})", hex::encode(key))
    } else if let Some(key) = x_only {
        format!("rawtr({})", hex::encode(key))
    } else if let Some(a) = address {
        format!("addr({a})")
    } else {
        format!("raw({})", hex::encode(s.as_bytes()))
    };
    let mut engine = miniscript::descriptor::checksum::Engine::new();
    let sum = match engine.input(&body) {
        Ok(()) => engine.checksum(),
        Err(_) => String::new(),
    };
    format!("{body}#{sum}")
}

/// `ScriptToUniv` as outputs and coins show it: asm, desc, hex, address, type.
pub fn script_pubkey(s: &Script, network: Network) -> Json {
    let address = Address::from_script(s, network)
        .ok()
        .filter(|_| !s.is_p2pk())
        .map(|a| a.to_string());
    let mut o = Json::Obj(vec![
        ("asm", Json::Str(script_asm(s, false))),
        ("desc", Json::Str(descriptor(s, address.as_deref()))),
        ("hex", hex(s.as_bytes())),
    ]);
    if let Some(a) = address {
        o.push("address", Json::Str(a));
    }
    o.push("type", Json::Str(script_type(s).into()));
    o
}

/// `TxToUniv`: with `coins` (the undo data, one per input) each input shows its `prevout` and
/// the transaction its `fee`; `prevouts` false keeps the fee alone (`getblock` verbosity 2).
pub fn transaction(
    tx: &Transaction,
    coins: Option<&[Coin]>,
    prevouts: bool,
    network: Network,
) -> Json {
    let weight = tx.weight().to_wu();
    let mut vin = Vec::new();
    for (i, input) in tx.input.iter().enumerate() {
        let mut o = Json::Obj(vec![]);
        if tx.is_coinbase() {
            o.push("coinbase", hex(input.script_sig.as_bytes()));
        } else {
            o.push("txid", Json::Str(input.previous_output.txid.to_string()));
            o.push("vout", num(input.previous_output.vout));
            o.push(
                "scriptSig",
                Json::Obj(vec![
                    ("asm", Json::Str(script_asm(&input.script_sig, true))),
                    ("hex", hex(input.script_sig.as_bytes())),
                ]),
            );
        }
        if !input.witness.is_empty() {
            o.push(
                "txinwitness",
                Json::Arr(input.witness.iter().map(hex).collect()),
            );
        }
        if let (Some(coin), true, false) =
            (coins.and_then(|c| c.get(i)), prevouts, tx.is_coinbase())
        {
            o.push(
                "prevout",
                Json::Obj(vec![
                    ("generated", num(coin.coinbase)),
                    ("height", num(coin.height)),
                    ("value", amount(coin.output.value)),
                    (
                        "scriptPubKey",
                        script_pubkey(&coin.output.script_pubkey, network),
                    ),
                ]),
            );
        }
        o.push("sequence", num(input.sequence.0));
        vin.push(o);
    }
    let vout = tx
        .output
        .iter()
        .enumerate()
        .map(|(n, out)| {
            Json::Obj(vec![
                ("value", amount(out.value)),
                ("n", num(n)),
                ("scriptPubKey", script_pubkey(&out.script_pubkey, network)),
            ])
        })
        .collect();
    let mut o = Json::Obj(vec![
        ("txid", Json::Str(tx.compute_txid().to_string())),
        ("hash", Json::Str(tx.compute_wtxid().to_string())),
        ("version", num(tx.version.0 as u32)),
        ("size", num(tx.total_size())),
        ("vsize", num(weight.div_ceil(4))),
        ("weight", num(weight)),
        ("locktime", num(tx.lock_time.to_consensus_u32())),
        ("vin", Json::Arr(vin)),
        ("vout", Json::Arr(vout)),
    ]);
    if let (Some(coins), false) = (coins, tx.is_coinbase()) {
        let spent: u64 = coins.iter().map(|c| c.output.value.to_sat()).sum();
        let paid: u64 = tx.output.iter().map(|o| o.value.to_sat()).sum();
        o.push("fee", signed_amount(spent as i64 - paid as i64));
    }
    o.push("hex", Json::Str(serialize_hex(tx)));
    o
}

/// What `getblock` adds to the header: sizes, the coinbase's summary and the transactions
/// (verbosity 1: txids; 2: described, with fees; 3: with prevouts too). `coins` holds each
/// transaction's spent coins, in block order.
pub fn block_details(
    block: &bitcoin::Block,
    coins: &[Option<Vec<Coin>>],
    verbosity: i64,
    network: Network,
) -> Json {
    let txs = block
        .txdata
        .iter()
        .zip(coins)
        .map(|(tx, coins)| match verbosity {
            1 => Json::Str(tx.compute_txid().to_string()),
            _ => transaction(tx, coins.as_deref(), verbosity >= 3, network),
        })
        .collect();
    let (size, weight) = (block.total_size() as u64, block.weight().to_wu());
    // weight = 3 × stripped size + size
    let stripped = (weight - size) / 3;
    Json::Obj(vec![
        ("strippedsize", num(stripped)),
        ("size", num(size)),
        ("weight", num(weight)),
        ("coinbase_tx", coinbase_summary(&block.txdata[0])),
        ("tx", Json::Arr(txs)),
    ])
}

/// Where a confirmed transaction is, as `getrawtransaction` tells it after the transaction.
pub struct Place {
    pub block: bitcoin::BlockHash,
    pub active: bool,
    pub confirmations: u32,
    pub time: u32,
    /// Whether the caller named the block (then `in_active_chain` comes first).
    pub asked: bool,
}

/// `getrawtransaction` of a confirmed transaction, verbosity 1 (no `coins`) or 2.
pub fn transaction_in_block(
    tx: &Transaction,
    coins: Option<&[Coin]>,
    at: &Place,
    network: Network,
) -> Json {
    let mut fields = vec![];
    if at.asked {
        fields.push(("in_active_chain", num(at.active)));
    }
    if let Json::Obj(f) = transaction(tx, coins, true, network) {
        fields.extend(f);
    }
    fields.push(("blockhash", Json::Str(at.block.to_string())));
    fields.push(("confirmations", num(at.confirmations)));
    // Core tells the time of blocks on the active chain only.
    if at.active {
        fields.push(("time", num(at.time)));
        fields.push(("blocktime", num(at.time)));
    }
    Json::Obj(fields)
}

/// The block's coinbase, as `getblock` shows it beside the header.
pub fn coinbase_summary(coinbase: &Transaction) -> Json {
    let input = &coinbase.input[0];
    let mut o = Json::Obj(vec![
        ("version", num(coinbase.version.0 as u32)),
        ("locktime", num(coinbase.lock_time.to_consensus_u32())),
        ("sequence", num(input.sequence.0)),
        ("coinbase", hex(input.script_sig.as_bytes())),
    ]);
    if let Some(w) = input.witness.iter().next() {
        o.push("witness", hex(w));
    }
    o
}

/// `head` (a rendered object) with `more`'s fields after its own.
pub fn extend(head: &Value, more: Json) -> Json {
    let head = head.to_string();
    let more = more.text();
    match (head.strip_suffix('}'), more.strip_prefix('{')) {
        (Some(h), Some(m)) if m != "}" && h != "{" => Json::Raw(format!("{h},{m}")),
        (Some(_), Some(_)) if head == "{}" => Json::Raw(more),
        _ => Json::Raw(head),
    }
}

/// `gettxout`'s answer for an unspent coin.
pub fn txout(best: &bitcoin::BlockHash, confirmations: u32, coin: &Coin, network: Network) -> Json {
    Json::Obj(vec![
        ("bestblock", Json::Str(best.to_string())),
        ("confirmations", num(confirmations)),
        ("value", amount(coin.output.value)),
        (
            "scriptPubKey",
            script_pubkey(&coin.output.script_pubkey, network),
        ),
        ("coinbase", num(coin.coinbase)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::ScriptBuf;

    #[test]
    fn amounts_have_eight_decimals() {
        assert_eq!(amount(Amount::from_sat(4_992_620)).text(), "0.04992620");
        assert_eq!(
            amount(Amount::from_sat(5_000_007_380)).text(),
            "50.00007380"
        );
        assert_eq!(amount(Amount::ZERO).text(), "0.00000000");
        assert_eq!(signed_amount(-1).text(), "-0.00000001");
    }

    fn described(hex_script: &str) -> (String, String) {
        let s = ScriptBuf::from_hex(hex_script).unwrap();
        let j = script_pubkey(&s, Network::Regtest).text();
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        let desc = v["desc"].as_str().unwrap().to_string();
        let (body, sum) = desc.split_once('#').unwrap();
        let mut engine = miniscript::descriptor::checksum::Engine::new();
        engine.input(body).unwrap();
        assert_eq!(sum, engine.checksum(), "{desc}: checksum");
        (v["type"].as_str().unwrap().to_string(), body.to_string())
    }

    #[test]
    fn scripts_get_cores_type_and_inferred_descriptor() {
        let g = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798";
        // A key on the curve; a valid header off the curve; a bad header.
        assert_eq!(
            described(&format!("21{g}ac")),
            ("pubkey".into(), format!("pk({g})"))
        );
        let off = format!("02{}", "00".repeat(32));
        assert_eq!(
            described(&format!("21{off}ac")),
            ("pubkey".into(), format!("raw(21{off}ac)"))
        );
        let bad = format!("05{}", "11".repeat(32));
        assert_eq!(described(&format!("21{bad}ac")).0, "nonstandard");
        // OP_RETURN followed by small numbers is push-only, so nulldata.
        assert_eq!(described("6a5152").0, "nulldata");
        assert_eq!(described("6aac").0, "nonstandard");
        // A v0 witness program of neither 20 nor 32 bytes is no witness type at all.
        assert_eq!(
            described(&format!("0019{}", "11".repeat(25))).0,
            "nonstandard"
        );
        assert_eq!(
            described(&format!("5119{}", "11".repeat(25))).0,
            "witness_unknown"
        );
        // Taproot with an x-only key off the curve has no rawtr(): its address instead.
        let (kind, body) = described(&format!("5120{}", "00".repeat(32)));
        assert_eq!(kind, "witness_v1_taproot");
        assert!(body.starts_with("addr(bcrt1p"), "{body}");
    }

    #[test]
    fn small_pushes_are_numbers_and_opcodes_have_core_names() {
        let s = ScriptBuf::from_hex("0051604f0181018204ffffff7fb1b2").unwrap();
        assert_eq!(
            script_asm(&s, false),
            "0 1 16 -1 -1 -2 2147483647 OP_CHECKLOCKTIMEVERIFY OP_CHECKSEQUENCEVERIFY"
        );
    }
}
