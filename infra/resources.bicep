// The resources of one Token Broker environment (see main.bicep for the parameters).

param environmentName string
param location string
param tags object
param principalId string
param adfPrincipalId string
param brokerAudience string
param prerefreshSchedule string
@secure()
param brokerStateSecret string
@secure()
param brokerApiKey string
@secure()
param brokerAdminKey string
param instanceMemoryMB int
param maximumInstanceCount int

var token = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName))
var appName = 'func-tb-${token}'
var deploymentContainer = 'app-package-${take(token, 8)}'

// Built-in role definition ids (learn.microsoft.com/azure/role-based-access-control/built-in-roles).
var roles = {
  keyVaultSecretsOfficer: 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: 'log-tb-${token}'
  location: location
  tags: tags
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: 30
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: 'appi-tb-${token}'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logs.id
    DisableLocalAuth: true
  }
}

// The Functions host's storage (keys, timer locks and schedule status, the deployment
// package) — reached by managed identity only: shared keys are off.
resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: 'sttb${token}'
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    supportsHttpsTrafficOnly: true
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource packageContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainer
}

// Tokens, client secrets and the broker's own keys. RBAC only; soft delete and purge
// protection keep a deleted token recoverable.
resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: 'kv-tb-${take(token, 15)}'
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: { family: 'A', name: 'standard' }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
  }
}

resource stateSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: 'broker-state-secret'
  properties: { value: brokerStateSecret }
}

resource apiKey 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: 'broker-api-key'
  properties: { value: brokerApiKey }
}

resource adminKey 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: 'broker-admin-key'
  properties: { value: brokerAdminKey }
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: 'plan-tb-${token}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: { tier: 'FlexConsumption', name: 'FC1' }
  properties: { reserved: true }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  name: appName
  location: location
  tags: union(tags, { 'azd-service-name': 'broker' })
  kind: 'functionapp,linux'
  identity: { type: 'SystemAssigned' }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
      appSettings: [
        { name: 'AzureWebJobsStorage__credential', value: 'managedidentity' }
        { name: 'AzureWebJobsStorage__blobServiceUri', value: storage.properties.primaryEndpoints.blob }
        { name: 'AzureWebJobsStorage__queueServiceUri', value: storage.properties.primaryEndpoints.queue }
        { name: 'AzureWebJobsStorage__tableServiceUri', value: storage.properties.primaryEndpoints.table }
        { name: 'AzureWebJobsStorage__accountName', value: storage.name }
        { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: appInsights.properties.ConnectionString }
        { name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'Authorization=AAD' }
        { name: 'PREREFRESH_SCHEDULE', value: prerefreshSchedule }
        { name: 'BROKER_CONFIG', value: 'broker.toml' }
        { name: 'BROKER_PUBLIC_URL', value: 'https://${appName}.azurewebsites.net' }
        { name: 'KEY_VAULT_URL', value: vault.properties.vaultUri }
        { name: 'BROKER_STATE_SECRET', value: '@Microsoft.KeyVault(SecretUri=${stateSecret.properties.secretUri})' }
        { name: 'BROKER_API_KEY', value: '@Microsoft.KeyVault(SecretUri=${apiKey.properties.secretUri})' }
        { name: 'BROKER_ADMIN_KEY', value: '@Microsoft.KeyVault(SecretUri=${adminKey.properties.secretUri})' }
        { name: 'AZURE_TENANT_ID', value: tenant().tenantId }
        { name: 'BROKER_AUDIENCE', value: brokerAudience }
        { name: 'ADF_PRINCIPAL_ID', value: adfPrincipalId }
        { name: 'RUST_LOG', value: 'info' }
        { name: 'BROKER_LOG_FORMAT', value: 'json' }
      ]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainer}'
          authentication: { type: 'SystemAssignedIdentity' }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: { name: 'custom', version: '1.0' }
    }
  }
}

// The app's identity: host storage (blobs incl. leases, queues, tables), telemetry, and the
// vault (reads and writes token secrets; Key Vault references read the broker's keys).
var appRoles = [
  { scope: 'storage', role: roles.storageBlobDataOwner }
  { scope: 'storage', role: roles.storageQueueDataContributor }
  { scope: 'storage', role: roles.storageTableDataContributor }
]

resource appStorageRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for assignment in appRoles: {
    name: guid(storage.id, app.id, assignment.role)
    scope: storage
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', assignment.role)
      principalId: app.identity.principalId
      principalType: 'ServicePrincipal'
    }
  }
]

resource appVaultRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, app.id, roles.keyVaultSecretsOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)
    principalId: app.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource appTelemetryRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, app.id, roles.monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: app.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// The deploying user may create client-secret secrets in the vault.
resource userVaultRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(principalId)) {
  name: guid(vault.id, principalId, roles.keyVaultSecretsOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)
    principalId: principalId
    principalType: 'User'
  }
}

output functionAppName string = app.name
output publicUrl string = 'https://${app.properties.defaultHostName}'
output keyVaultUrl string = vault.properties.vaultUri
output principalId string = app.identity.principalId
