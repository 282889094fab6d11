// Token Broker on Azure: a Flex Consumption Function App running the custom handler, with a
// system-assigned managed identity that owns its tokens in Key Vault (RBAC) and uses the
// Functions storage account by identity. `azd up` provisions this and deploys the app.
targetScope = 'subscription'

@minLength(1)
@maxLength(40)
@description('azd environment name; names and tags derive from it.')
param environmentName string

@minLength(1)
@description('Azure region for every resource.')
@metadata({ azd: { type: 'location' } })
param location string

@description('Object id of the deploying user (azd sets it): gets "Key Vault Secrets Officer" to create client-secret secrets. Empty to skip.')
param principalId string = ''

// azd resolves AZURE_PRINCIPAL_TYPE to the signed-in principal's type, "User" or
// "ServicePrincipal" (azure-dev cli/azd/pkg/environment/environment.go PrincipalTypeEnvVarName,
// pkg/infra/provisioning/bicep/bicep_provider.go evalParamEnvSubst; azd's own scaffold maps it
// in main.parameters.json the same way). A role assignment whose principalType does not match
// the principal fails with UnmatchedPrincipalType (azure-dev issue #3581), e.g. in CI.
@description('Type of principalId (AZURE_PRINCIPAL_TYPE): User or ServicePrincipal. Empty: User.')
param principalType string = 'User'

@description('Object id of the Data Factory managed identity allowed to call /api/refresh (ADF_PRINCIPAL_ID). Set after creating the factory. Empty: the nil GUID, which authorizes nobody.')
param adfPrincipalId string = ''

@description('Audience (Application ID URI or client id) of the broker app registration that Data Factory requests tokens for. Empty: api://{tenantId}/token-broker-{environmentName}.')
param brokerAudience string = ''

@description('NCRONTAB schedule (UTC) of the pre-refresh timer. Empty: every 5 minutes.')
param prerefreshSchedule string = ''

@secure()
@minLength(32)
@description('Signs OAuth state across instances (BROKER_STATE_SECRET). Stored in Key Vault.')
param brokerStateSecret string

@secure()
@minLength(16)
@description('API key for scripts calling /api/refresh (BROKER_API_KEY). Stored in Key Vault.')
param brokerApiKey string

@secure()
@minLength(16)
@description('Admin key for /api/authorize and /api/connections (BROKER_ADMIN_KEY). Stored in Key Vault.')
param brokerAdminKey string

// The vault's name is chosen once per environment lifetime, not derived from the app's name:
// azd's preprovision hook (infra/hooks/preprovision.sh) stores a random KEY_VAULT_NAME in the
// azd environment when it has none, and `azd down` removes every template output (this
// template outputs KEY_VAULT_NAME) from the environment (azure-dev
// pkg/infra/provisioning/manager.go Destroy: InvalidatedEnvKeys → DotenvDelete). So every
// provision of one deployment finds the same vault, and the `azd up` after an `azd down`
// creates a new one instead of colliding with the soft-deleted, purge-protected old vault.
@maxLength(24)
@description('Key Vault name (KEY_VAULT_NAME; the azd preprovision hook picks a random one). Empty: derived from the subscription and environment name with a seed of its own.')
param keyVaultName string = ''

@description('E-mail address that receives the alert when a connection needs attention (ALERT_EMAIL). Empty: no action group and no alert.')
param alertEmail string = ''

@secure()
@description('Optional webhook the broker itself posts connection state changes to (ALERT_WEBHOOK_URL, app setting BROKER_ALERT_WEBHOOK_URL). Empty: no setting.')
param alertWebhookUrl string = ''

@secure()
@description('Optional Standard Webhooks secret (whsec_ + base64) the broker signs its webhook posts with (ALERT_WEBHOOK_SECRET, app setting BROKER_ALERT_WEBHOOK_SECRET). Stored in Key Vault. Empty: posts are not signed.')
param alertWebhookSecret string = ''

@description('Optional application (client) id of the app registration admins sign in to (ADMIN_SIGN_IN_CLIENT_ID, app setting BROKER_SIGN_IN_CLIENT_ID; docs/deployment.md). Empty: no setting.')
param adminSignInClientId string = ''

@allowed([512, 2048, 4096])
param instanceMemoryMB int = 512

@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

var tags = { 'azd-env-name': environmentName }

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module resources 'resources.bicep' = {
  name: 'token-broker-resources'
  scope: rg
  params: {
    environmentName: environmentName
    location: location
    tags: tags
    principalId: principalId
    principalType: empty(principalType) ? 'User' : principalType
    // The nil GUID is no object's id: with it, allowed_principals authorizes nobody, and the
    // setting is never empty (a missing variable would stop the broker at startup).
    adfPrincipalId: empty(adfPrincipalId) ? '00000000-0000-0000-0000-000000000000' : adfPrincipalId
    // Entra's secure identifier-URI policy refuses new App ID URIs of the form api://{string};
    // api://{tenantId}/{string} is one of the accepted forms
    // (learn.microsoft.com/entra/identity-platform/identifier-uri-restrictions).
    brokerAudience: empty(brokerAudience) ? 'api://${tenant().tenantId}/token-broker-${environmentName}' : brokerAudience
    prerefreshSchedule: empty(prerefreshSchedule) ? '0 */5 * * * *' : prerefreshSchedule
    brokerStateSecret: brokerStateSecret
    brokerApiKey: brokerApiKey
    brokerAdminKey: brokerAdminKey
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    // A seed of its own: the vault's name cannot be computed from the app's public host name.
    keyVaultName: empty(keyVaultName) ? 'kv-tb-${uniqueString(subscription().id, environmentName, 'key-vault')}' : keyVaultName
    alertEmail: alertEmail
    alertWebhookUrl: alertWebhookUrl
    alertWebhookSecret: alertWebhookSecret
    adminSignInClientId: adminSignInClientId
  }
}

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_NAME string = resources.outputs.functionAppName
output BROKER_PUBLIC_URL string = resources.outputs.publicUrl
output KEY_VAULT_URL string = resources.outputs.keyVaultUrl
output KEY_VAULT_NAME string = resources.outputs.keyVaultName
output BROKER_PRINCIPAL_ID string = resources.outputs.principalId
