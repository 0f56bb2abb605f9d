//! Output descriptors as watches: parsing, network checks and address derivation (miniscript).

use std::str::FromStr;
use std::sync::LazyLock;

use bitcoin::secp256k1::{Secp256k1, VerifyOnly};
use bitcoin::{Network, ScriptBuf};
use miniscript::descriptor::{Descriptor, DescriptorPublicKey};
use miniscript::ForEachKey;

#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    #[error("not a valid descriptor: {0}")]
    Parse(String),
    #[error("descriptor has private keys; give the public (xpub/tpub) form")]
    Private,
    #[error("descriptor keys are for {found}, the config says {expected}")]
    Network {
        found: &'static str,
        expected: &'static str,
    },
    #[error("cannot derive index {index}: {reason}")]
    Derive { index: u32, reason: String },
}

/// A descriptor split into its single paths (one, or two for `<0;1>` multipath).
#[derive(Debug, Clone)]
pub struct WatchedDescriptor {
    original: Descriptor<DescriptorPublicKey>,
    pub paths: Vec<Descriptor<DescriptorPublicKey>>,
    pub network: Network,
}

fn kind_name(mainnet: bool) -> &'static str {
    if mainnet {
        "mainnet (xpub)"
    } else {
        "a test network (tpub)"
    }
}

impl WatchedDescriptor {
    pub fn parse(text: &str, network: Network) -> Result<WatchedDescriptor, DescriptorError> {
        if Descriptor::parse_descriptor(
            &miniscript::bitcoin::secp256k1::Secp256k1::signing_only(),
            text,
        )
        .map(|(_, keys)| !keys.is_empty())
        .unwrap_or(false)
        {
            return Err(DescriptorError::Private);
        }
        let original = Descriptor::<DescriptorPublicKey>::from_str(text.trim())
            .map_err(|e| DescriptorError::Parse(e.to_string()))?;
        let want_mainnet = network == Network::Bitcoin;
        let mut wrong = None;
        original.for_each_key(|k| {
            if let DescriptorPublicKey::XPub(x) = k {
                if x.xkey.network.is_mainnet() != want_mainnet {
                    wrong = Some(x.xkey.network.is_mainnet());
                }
            }
            if let DescriptorPublicKey::MultiXPub(x) = k {
                if x.xkey.network.is_mainnet() != want_mainnet {
                    wrong = Some(x.xkey.network.is_mainnet());
                }
            }
            true
        });
        if let Some(found_mainnet) = wrong {
            return Err(DescriptorError::Network {
                found: kind_name(found_mainnet),
                expected: kind_name(want_mainnet),
            });
        }
        let paths = original
            .clone()
            .into_single_descriptors()
            .map_err(|e| DescriptorError::Parse(e.to_string()))?;
        Ok(WatchedDescriptor {
            original,
            paths,
            network,
        })
    }

    /// The form stored and hashed into the watch id: with its checksum, as miniscript prints it.
    pub fn canonical(&self) -> String {
        self.original.to_string()
    }

    pub fn is_ranged(&self) -> bool {
        self.original.has_wildcard()
    }

    pub fn is_multipath(&self) -> bool {
        self.paths.len() > 1
    }

    /// The script and address of path `path` at `index`.
    pub fn derive(&self, path: usize, index: u32) -> Result<(ScriptBuf, String), DescriptorError> {
        // Keys derived once, here: the definite descriptor's own `script_pubkey` and `address`
        // would each derive them again, each with a context of its own.
        static SECP: LazyLock<Secp256k1<VerifyOnly>> = LazyLock::new(Secp256k1::verification_only);
        let d = self.paths[path]
            .at_derivation_index(index)
            .map_err(|e| DescriptorError::Derive {
                index,
                reason: e.to_string(),
            })?
            .derived_descriptor(&SECP);
        let address = d
            .address(self.network)
            .map_err(|e| DescriptorError::Derive {
                index,
                reason: e.to_string(),
            })?;
        Ok((d.script_pubkey(), address.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::bip32::{DerivationPath, Xpriv, Xpub};

    /// The BIP39 seed of "abandon abandon … about", from which BIP44/49/84/86 publish vectors.
    const SEED: &str = "5eb00bbddcf069084889a8ab9155568165f5c453ccb85e70811aaed6f6da5fc19a5ac40b389cd370d086206dec8aa6c43daea6690f20ad3d8d48b2d2ce9e38e4";

    fn account_xpub(path: &str) -> Xpub {
        let secp = bitcoin::secp256k1::Secp256k1::new();
        let master =
            Xpriv::new_master(bitcoin::NetworkKind::Main, &hex::decode(SEED).unwrap()).unwrap();
        let p: DerivationPath = path.parse().unwrap();
        Xpub::from_priv(&secp, &master.derive_priv(&secp, &p).unwrap())
    }

    fn first_address(template: &str, path: &str) -> String {
        let text = template.replace("KEY", &format!("{}/0/*", account_xpub(path)));
        WatchedDescriptor::parse(&text, Network::Bitcoin)
            .unwrap()
            .derive(0, 0)
            .unwrap()
            .1
    }

    #[test]
    fn derivation_matches_the_published_bip_vectors() {
        assert_eq!(
            first_address("pkh(KEY)", "m/44'/0'/0'"),
            "1LqBGSKuX5yYUonjxT5qGfpUsXKYYWeabA",
            "BIP44"
        );
        assert_eq!(
            first_address("sh(wpkh(KEY))", "m/49'/0'/0'"),
            "37VucYSaXLCAsxYyAPfbSi9eh4iEcbShgf",
            "BIP49"
        );
        assert_eq!(
            first_address("wpkh(KEY)", "m/84'/0'/0'"),
            "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu",
            "BIP84"
        );
        assert_eq!(
            first_address("tr(KEY)", "m/86'/0'/0'"),
            "bc1p5cyxnuxmeuwuvkwfem96lqzszd02n6xdcjrs20cac6yqjjwudpxqkedrcr",
            "BIP86"
        );
    }

    #[test]
    fn derivation_matches_bitcoin_cores_deriveaddresses() {
        // From the captures: `deriveaddresses <the shop wallet's wpkh descriptor> [0, 4]`.
        let d = "wpkh([ef03ecfa/84h/1h/0h]tpubDDqrRTGGpApdar6GULkh3EFCoiGJTTkLnfidWJe4GKDAEMqkx3Jh2Yzz1bbA76HWSuwzp7W3ZWzKa78cWXvEtc4eqsqRz8VzzMNVDPf3X9p/0/*)#qgmdk2f6";
        let core = [
            "bcrt1q5nrgwcwrnyy904s3vhlpnlmpkjypk9alphelkp",
            "bcrt1q6vndjcals8etdp6v5wujmk2t8j369ay0jkzhkw",
            "bcrt1qvuashvad4jd5e6zvlk7qm66umyeq7gc5e5lj5r",
            "bcrt1q4lckn0u4xydqzzg3ta4gap8xpmgncplcs4wkjv",
            "bcrt1qkwjspwqv7yky6hxt0l0regxzmaapua45hncf2x",
        ];
        let w = WatchedDescriptor::parse(d, Network::Regtest).unwrap();
        let canonical = w.canonical();
        assert!(
            canonical.contains("/84'/1'/0']") && canonical.contains('#'),
            "{canonical}"
        );
        let again = WatchedDescriptor::parse(&canonical, Network::Regtest)
            .unwrap()
            .canonical();
        assert_eq!(
            again, canonical,
            "both spellings of hardened steps give one canonical form"
        );
        for (i, want) in core.iter().enumerate() {
            assert_eq!(w.derive(0, i as u32).unwrap().1, *want, "index {i}");
        }
    }

    #[test]
    fn multipath_splits_into_receive_and_change() {
        let d = "wpkh([ef03ecfa/84h/1h/0h]tpubDDqrRTGGpApdar6GULkh3EFCoiGJTTkLnfidWJe4GKDAEMqkx3Jh2Yzz1bbA76HWSuwzp7W3ZWzKa78cWXvEtc4eqsqRz8VzzMNVDPf3X9p/<0;1>/*)";
        let w = WatchedDescriptor::parse(d, Network::Regtest).unwrap();
        assert!(w.is_multipath());
        assert_eq!(
            w.derive(0, 0).unwrap().1,
            "bcrt1q5nrgwcwrnyy904s3vhlpnlmpkjypk9alphelkp",
            "path 0 is the receive chain"
        );
        assert_ne!(w.derive(1, 0).unwrap().1, w.derive(0, 0).unwrap().1);
    }

    #[test]
    fn refusals_say_why() {
        let mainnet_key = format!("wpkh({}/0/*)", account_xpub("m/84'/0'/0'"));
        let e = WatchedDescriptor::parse(&mainnet_key, Network::Regtest)
            .unwrap_err()
            .to_string();
        assert!(e.contains("mainnet") && e.contains("test network"), "{e}");
        let e = WatchedDescriptor::parse("wpkh(nonsense)", Network::Regtest)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("not a valid descriptor"), "{e}");
        let bad_checksum = "wpkh([ef03ecfa/84h/1h/0h]tpubDDqrRTGGpApdar6GULkh3EFCoiGJTTkLnfidWJe4GKDAEMqkx3Jh2Yzz1bbA76HWSuwzp7W3ZWzKa78cWXvEtc4eqsqRz8VzzMNVDPf3X9p/0/*)#qgmdk2f7";
        assert!(
            WatchedDescriptor::parse(bad_checksum, Network::Regtest).is_err(),
            "a wrong checksum is refused"
        );
        let xprv = "wpkh(tprv8ZgxMBicQKsPd7Uf69XL1XwhmjHopUGep8GuEiJDZmbQz6o58LninorQAfcKZWARbtRtfnLcJ5MQ2AtHcQJCCRUcMRvmDUjyEmNUWwx8UbK/0/*)";
        assert!(WatchedDescriptor::parse(xprv, Network::Regtest)
            .unwrap_err()
            .to_string()
            .contains("private keys"));
    }
}
