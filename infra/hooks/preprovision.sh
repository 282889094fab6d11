#!/bin/sh
# azd preprovision hook: give this deployment a Key Vault name of its own, once.
#
# Key Vault names are global, a deleted vault keeps its name for the retention period (90 days
# here) and purge protection stops anyone from purging it early, so a name derived from the
# environment name would make the `azd up` after an `azd down` fail. Instead a random name is
# stored in the azd environment the first time; every later provision reuses it. `azd down`
# removes the template's outputs, KEY_VAULT_NAME among them, from the environment, so the next
# `azd up` picks a new name (and gets a new, empty vault). azd passes the environment's values
# to hooks as variables and reloads the environment after each hook.
#
# To keep using an existing vault (another machine, or an environment created before this
# hook): `azd env refresh` (loads the last deployment's outputs) or
# `azd env set KEY_VAULT_NAME <name>`.
set -eu

if [ -z "${KEY_VAULT_NAME:-}" ]; then
  # 12 hex characters: "kv-tb-" + 12 = 18 of the 3–24 characters a vault name may have.
  suffix=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
  azd env set KEY_VAULT_NAME "kv-tb-$suffix" --environment "$AZURE_ENV_NAME"
  echo "Key Vault name for this deployment: kv-tb-$suffix"
fi
