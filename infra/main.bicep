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

@description('Object id of the Data Factory managed identity allowed to call /api/refresh (ADF_PRINCIPAL_ID). Set after creating the factory.')
param adfPrincipalId string = ''

@description('Audience (Application ID URI or client id) of the broker app registration that Data Factory requests tokens for. Empty: api://token-broker-{environmentName}.')
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
    adfPrincipalId: adfPrincipalId
    brokerAudience: empty(brokerAudience) ? 'api://token-broker-${environmentName}' : brokerAudience
    prerefreshSchedule: empty(prerefreshSchedule) ? '0 */5 * * * *' : prerefreshSchedule
    brokerStateSecret: brokerStateSecret
    brokerApiKey: brokerApiKey
    brokerAdminKey: brokerAdminKey
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
  }
}

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_NAME string = resources.outputs.functionAppName
output BROKER_PUBLIC_URL string = resources.outputs.publicUrl
output KEY_VAULT_URL string = resources.outputs.keyVaultUrl
output BROKER_PRINCIPAL_ID string = resources.outputs.principalId
