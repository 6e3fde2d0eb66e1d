//! A fixed 2048-bit RSA key for tests of the certificate (client assertion) flow.
//!
//! ring cannot generate RSA keys and Entra ID client assertions are RSA-signed, so tests share
//! this published key. It protects nothing: never register it anywhere real.

/// PKCS#8 PEM of the test key.
pub const TEST_RSA_KEY_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCuET8KMeljUnWr\n\
yOTWmtwGxXci1zjkYjdGvmRH7JbgZNk4JLXHEkO9njY+j59L7K47rQCkAuJpnF/2\n\
wURFj/hAi9zcqQUkGAUMP40A5fR+nM0L88zKqO545CYnR6khOA0SDvfCZFQzrv9i\n\
et7Ber7q9sFx5Nv98IZ1CyLQDFIuwLzBmmTKu66eK8NlUglzG1oZnJKg5OybZ3Vu\n\
kvtj6yUy5AHDd4CTcQ5OuvUmhDMXrUQH3MLJmwa2m4TZk6tAsOX76ilGcxLxecbu\n\
t7ERCOMg7dU15JHoib9E7FVU+Q85lle/pfJfIuEieRzCKSLbjQw0T4dRU8OxRF6K\n\
D1uKbDd5AgMBAAECggEAP7Gl3Kgo26Q31LU9L14ZNw0YrBIPClr6GRPgBAWJq/Cb\n\
H5UnQwHm8cKr3LaXNqQTmViTzHAVw0lqQBO2VLH6yDulhMUAUZXMew/iG7sJfS8J\n\
RN9gR6QLJwdtAqCRPcuR1NLPTD2EJilZ4AJP8oJky/uhC3kQGtrhiICbq39mrx5S\n\
DkehJwwzOqi7TgC65YtOCiSr2qQbzsdftLmWk5ejQfkVjSkykueNucD6yqZVP2Fx\n\
fipj8uURvjhEMkGeJbzu8o91xmT24PEZQma8344NZIrL9nB/LD0TiSqJzX2uO1Eh\n\
ju4bYyVogHNxZmD7g0MlHePpWUK/oTc8UBVVEv0D1QKBgQDukAISHdmQJo0J6S9Q\n\
dXIRreDk6gfm96ZQD6ETITiH7hHpIcloeEDxHCw/t5Xn0RWKUb26ZO15Hk4E0Svm\n\
EeaVAnT+Rs2np+NeHnj7ZfW5l7H7u+ugX1BlsacEi9bYaG+BV5EpD6lqWO/oQZ4x\n\
0AtsVpVkib3qYW9sJ3cltJZj4wKBgQC6ymbp9LOi9+SE089cmERPt8OvWCH9OpeK\n\
NP0UtbWKeV7iftQW+TqiC8ngBTQA7/IwD1hYpVDKSmKMCWkqFIdVUxpcoPipJphB\n\
CxYTxCw/1H3IyenaX7SxT706wH4IpasHYiODv6lVwotaNWLFs4wKEo7VxHpUX/7R\n\
1VLn3xmt8wKBgQCGqo4wsd71i32EQbiuv42Dw1a3ghCx5cxhV2FCzjb+LHq50pPC\n\
QFfQg2nLEhQyBwoUya3DQWP4Qg4ik/0m46X5KajnPQqsgI5Nu//pUhYTDTmwc9U/\n\
824L6evxGgtOoC2JoufTeP7WhJvwzNHDJsC8CGhOl564ZwYh1GlixH08pwKBgQC0\n\
5YHHf+lcobBZBvwiU4CMp45GyRaZtF3ARlL29IdtJN/EgEmMOjATcVE/uCpF4hrt\n\
el738poMXv+TWSXUz+7ErmewX2CSCEOZclAeMnUcGAD9LLZiex92PKApPvSQEUlS\n\
LDPyyvIGkRL9+QfAKYMs2g4kblR+VD1nH65byo+HCwKBgAtoYvEvwAJoOfTKNCOC\n\
H3HjVUa1TMhttZkBmsHPkXp1so80TrQleXIhp+2ciJmqanAIc6R3eFlNGY36ZkgR\n\
WSQP5XW2r+8RO9w54nMwxKh8RpPYyc55m2rtmEL09xERLrK6vt7NHiYpEtYWhG9J\n\
ERsfzE9TBECDYs/Y4Y0sARDL\n\
-----END PRIVATE KEY-----\n\
";
