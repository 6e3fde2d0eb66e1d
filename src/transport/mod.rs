//! Transport: how queued mail leaves the machine. `oauth` fetches and caches the OAuth2
//! access tokens that XOAUTH2 submission needs. Trusts nothing it receives from the network
//! until TLS has verified the peer.
pub mod oauth;
