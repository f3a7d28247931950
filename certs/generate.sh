#!/usr/bin/env bash
# Makes a DEVELOPMENT certificate authority, a server certificate for localhost and a client
# certificate, with openssl. Never use these in production: the private keys are public (they
# are committed to the repository). See README.md ("TLS") for real certificates.
#
#   certs/generate.sh [DIR] [CLIENT_NAME]     (defaults: the certs/ directory, sensor-1)
set -euo pipefail
dir="${1:-$(dirname "$0")}"
client="${2:-sensor-1}"
days=3650
cd "$dir"
command -v openssl >/dev/null || { echo "openssl is needed (Debian: apt-get install openssl)" >&2; exit 1; }

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -keyout ca.key -out ca.pem -subj "/O=telemq development/CN=telemq development CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() { # name subject extensions
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.csr" \
    -subj "$2" 2>/dev/null
  printf '%s\n' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" \
    -out "$1.pem" -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
issue server "/O=telemq development/CN=localhost" \
  "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature"
issue client "/O=telemq development/CN=$client" \
  "subjectAltName=DNS:$client.devices.local
extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature"
rm -f ca.srl
chmod 600 ./*.key
echo "wrote $(pwd)/{ca,server,client}.{pem,key} (development only)"
