//! Where a transaction's money came from: one entry per input, naming the coin it spends, that
//! coin's address and amount. The node tells the coins (`getblock HASH 3`, `gettxout`); what it
//! says is checked here against the transaction we decoded and proved ourselves, and the
//! address is derived from the coin's script, never taken from the node's text.

use bitcoin::{Address, Amount, Network, OutPoint, ScriptBuf, Transaction};
use serde::{Deserialize, Serialize};

/// One input of a transaction, as events show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    /// `txid:vout` of the coin spent.
    pub prevout: String,
    /// `None` for a script with no address form (bare multisig, P2PK, non-standard).
    pub address: Option<String>,
    pub amount_sat: u64,
}

/// Every input of a transaction, in order; a coinbase has none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Senders {
    pub coinbase: bool,
    pub inputs: Vec<Sender>,
}

/// A coin an input spends, as the node describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpentCoin {
    pub outpoint: OutPoint,
    pub script: ScriptBuf,
    pub amount: Amount,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendersError {
    #[error("the node described {got} spent coins for a transaction with {want} inputs")]
    Count { got: usize, want: usize },
    #[error("input {index} spends {want}, the node described {got}")]
    Outpoint {
        index: usize,
        want: OutPoint,
        got: OutPoint,
    },
    #[error("input {index}: an amount of {amount} is more than can exist")]
    Amount { index: usize, amount: Amount },
    #[error("the spent coins add up to more than can exist")]
    Total,
    #[error("the spent coins ({spent}) add up to less than the outputs pay ({paid})")]
    LessThanPaid { spent: Amount, paid: Amount },
}

impl Senders {
    pub fn coinbase() -> Senders {
        Senders {
            coinbase: true,
            inputs: vec![],
        }
    }

    /// The senders of `tx` from the coins its inputs spend, in input order. Refused unless
    /// each coin is the one its input names and the amounts are possible.
    pub fn of(
        tx: &Transaction,
        coins: &[SpentCoin],
        network: Network,
    ) -> Result<Senders, SendersError> {
        if tx.is_coinbase() {
            return Ok(Senders::coinbase());
        }
        if coins.len() != tx.input.len() {
            return Err(SendersError::Count {
                got: coins.len(),
                want: tx.input.len(),
            });
        }
        let mut total = Amount::ZERO;
        let mut inputs = Vec::with_capacity(coins.len());
        for (index, (input, coin)) in tx.input.iter().zip(coins).enumerate() {
            if input.previous_output != coin.outpoint {
                return Err(SendersError::Outpoint {
                    index,
                    want: input.previous_output,
                    got: coin.outpoint,
                });
            }
            if coin.amount > Amount::MAX_MONEY {
                return Err(SendersError::Amount {
                    index,
                    amount: coin.amount,
                });
            }
            total = total
                .checked_add(coin.amount)
                .filter(|t| *t <= Amount::MAX_MONEY)
                .ok_or(SendersError::Total)?;
            inputs.push(Sender {
                prevout: coin.outpoint.to_string(),
                address: address_of(&coin.script, network),
                amount_sat: coin.amount.to_sat(),
            });
        }
        let paid = tx
            .output
            .iter()
            .try_fold(Amount::ZERO, |t, o| t.checked_add(o.value))
            .unwrap_or(Amount::MAX);
        if total < paid {
            return Err(SendersError::LessThanPaid { spent: total, paid });
        }
        Ok(Senders {
            coinbase: false,
            inputs,
        })
    }
}

/// The address a script pays, if it has one on `network`.
pub fn address_of(script: &ScriptBuf, network: Network) -> Option<String> {
    Address::from_script(script, network)
        .ok()
        .map(|a| a.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::hashes::Hash;
    use bitcoin::{absolute, transaction, TxIn, Txid};

    fn tx_spending(outpoints: &[OutPoint]) -> Transaction {
        Transaction {
            version: transaction::Version::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: outpoints
                .iter()
                .map(|o| TxIn {
                    previous_output: *o,
                    ..TxIn::default()
                })
                .collect(),
            output: vec![],
        }
    }

    fn coin(outpoint: OutPoint, script: &str, sat: u64) -> SpentCoin {
        SpentCoin {
            outpoint,
            script: ScriptBuf::from_hex(script).unwrap(),
            amount: Amount::from_sat(sat),
        }
    }

    fn op(n: u8, vout: u32) -> OutPoint {
        OutPoint::new(Txid::from_byte_array([n; 32]), vout)
    }

    #[test]
    fn addresses_come_from_the_scripts_and_a_bare_script_has_none() {
        let tx = tx_spending(&[op(1, 0), op(2, 1)]);
        let coins = [
            coin(
                op(1, 0),
                "76a9144684755e850be637efa417f3c4bf4ac1b157760388ac",
                30_000_000,
            ),
            coin(op(2, 1), "51", 5),
        ];
        let s = Senders::of(&tx, &coins, Network::Regtest).unwrap();
        assert!(!s.coinbase);
        assert_eq!(
            s.inputs[0].address.as_deref(),
            Some("mmwpGrjMjXVrLxVvMKqdbFNbF4opv8PJ8F"),
            "p2pkh address as Core names it"
        );
        assert_eq!(s.inputs[0].amount_sat, 30_000_000);
        assert_eq!(s.inputs[0].prevout, format!("{}:0", op(1, 0).txid));
        assert_eq!(s.inputs[1].address, None, "OP_TRUE has no address");
    }

    #[test]
    fn coins_that_are_not_the_inputs_are_refused() {
        let tx = tx_spending(&[op(1, 0), op(2, 1)]);
        let one = [coin(op(1, 0), "51", 1)];
        assert_eq!(
            Senders::of(&tx, &one, Network::Regtest),
            Err(SendersError::Count { got: 1, want: 2 })
        );
        let swapped = [coin(op(2, 1), "51", 1), coin(op(1, 0), "51", 1)];
        assert!(matches!(
            Senders::of(&tx, &swapped, Network::Regtest),
            Err(SendersError::Outpoint { index: 0, .. })
        ));
        let huge = [
            coin(op(1, 0), "51", 21_000_000 * 100_000_000),
            coin(op(2, 1), "51", 1),
        ];
        assert_eq!(
            Senders::of(&tx, &huge, Network::Regtest),
            Err(SendersError::Total),
            "two coins worth more than every bitcoin together"
        );
    }
}
