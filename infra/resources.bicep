// The resources of one Token Broker environment (see main.bicep for the parameters).

param environmentName string
param location string
param tags object
param principalId string
param principalType string
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
param keyVaultName string
param alertEmail string
@secure()
param alertWebhookUrl string
@secure()
param alertWebhookSecret string
param adminSignInClientId string

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
//
// A deleted vault stays soft-deleted for softDeleteRetentionInDays, and its name cannot be
// reused meanwhile: creating a vault (createMode 'default') whose name a soft-deleted vault
// holds fails, and createMode 'recover' fails when there is none to recover
// (azure.github.io/azure-service-operator/guide/keyvaults), so neither mode suits a template
// that must work on the first and on every later `azd up`. Purge protection also means
// nobody can purge it early: `azd down --purge` skips vaults with purge protection (azure-dev
// pkg/infra/provisioning/bicep/bicep_provider.go getKeyVaultsToPurge). Hence the name comes
// from main.bicep: one random name per deployment lifetime (see keyVaultName there), so the
// `azd up` after an `azd down` gets a new, empty vault, and the old one stays recoverable
// (`az keyvault recover`) for 90 days. The trade-off: a redeployment starts with no tokens and
// no client secrets; keeping purge protection keeps what was deleted recoverable.
resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: keyVaultName
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

resource webhookSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(alertWebhookSecret)) {
  parent: vault
  name: 'broker-alert-webhook-secret'
  properties: { value: alertWebhookSecret }
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

// The site is created without app settings; they follow in `appSettings` below, once the
// app's identity holds its vault role (see there).
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

// The deploying principal may create client-secret secrets in the vault. azd passes its type
// (AZURE_PRINCIPAL_TYPE: User, or ServicePrincipal when azd runs as one).
resource userVaultRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(principalId)) {
  name: guid(vault.id, principalId, roles.keyVaultSecretsOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)
    principalId: principalId
    principalType: principalType
  }
}

// Every app setting. A Key Vault reference that cannot be resolved stays the literal
// `@Microsoft.KeyVault(...)` text, and references in siteConfig.appSettings are resolved when
// the site is created, before a role assignment made for its new system-assigned identity
// exists. App Service's documentation (azure-docs articles/app-service/
// app-service-key-vault-references.md, "Azure Resource Manager deployment") therefore defines
// the settings as their own resource, applied after the identity has been granted access; this
// is also how Microsoft's Flex Consumption azd templates set them (Azure-Samples/
// functions-quickstart-dotnet-azd infra/core/host/functions-flexconsumption.bicep). The same
// page's alternative, a user-assigned identity granted before the app exists
// (keyVaultReferenceIdentity), would add a second identity used for nothing else.
// Role assignments can still take minutes to apply everywhere; any later change to the app's
// configuration makes App Service fetch every reference again (same page, "Rotation").
//
// A sites/config 'appsettings' resource replaces the whole set, so it carries all of them.
// On Flex Consumption the runtime, the deployment storage and scaling live in
// functionAppConfig, and FUNCTIONS_WORKER_RUNTIME, FUNCTIONS_EXTENSION_VERSION,
// WEBSITE_RUN_FROM_PACKAGE and the content-share settings must not be set (azure-docs
// functions-app-settings.md, "Flex Consumption plan deprecations"); the host's storage
// (AzureWebJobsStorage__*) and Application Insights settings stay app settings.
var brokerSettings = [
  { name: 'AzureWebJobsStorage__credential', value: 'managedidentity' }
  { name: 'AzureWebJobsStorage__blobServiceUri', value: storage.properties.primaryEndpoints.blob }
  { name: 'AzureWebJobsStorage__queueServiceUri', value: storage.properties.primaryEndpoints.queue }
  { name: 'AzureWebJobsStorage__tableServiceUri', value: storage.properties.primaryEndpoints.table }
  { name: 'AzureWebJobsStorage__accountName', value: storage.name }
  { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: appInsights.properties.ConnectionString }
  { name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'Authorization=AAD' }
  { name: 'PREREFRESH_SCHEDULE', value: prerefreshSchedule }
  { name: 'BROKER_CONFIG', value: 'broker.toml' }
  // The site's own host name (Microsoft's Flex templates output https://{defaultHostName}
  // too); not assumed to be {name}.azurewebsites.net.
  { name: 'BROKER_PUBLIC_URL', value: 'https://${app.properties.defaultHostName}' }
  { name: 'KEY_VAULT_URL', value: vault.properties.vaultUri }
  { name: 'BROKER_STATE_SECRET', value: '@Microsoft.KeyVault(SecretUri=${stateSecret.properties.secretUri})' }
  { name: 'BROKER_API_KEY', value: '@Microsoft.KeyVault(SecretUri=${apiKey.properties.secretUri})' }
  { name: 'BROKER_ADMIN_KEY', value: '@Microsoft.KeyVault(SecretUri=${adminKey.properties.secretUri})' }
  { name: 'AZURE_TENANT_ID', value: tenant().tenantId }
  { name: 'BROKER_AUDIENCE', value: brokerAudience }
  // Never empty (main.bicep writes the nil GUID, which authorizes nobody, until
  // ADF_PRINCIPAL_ID is set): an empty setting may be dropped, and the broker then stops on
  // a missing variable.
  { name: 'ADF_PRINCIPAL_ID', value: adfPrincipalId }
  { name: 'RUST_LOG', value: 'info' }
  // JSON lines on stderr; the connection-state alert below matches them.
  { name: 'BROKER_LOG_FORMAT', value: 'json' }
]

// Only when set: the broker posts connection state changes there.
var webhookSettings = concat(empty(alertWebhookUrl) ? [] : [
  { name: 'BROKER_ALERT_WEBHOOK_URL', value: alertWebhookUrl }
], empty(alertWebhookSecret) ? [] : [
  // Signs the posts (Standard Webhooks); the secret stays in the vault. Named by vault and
  // secret rather than through the conditional resource's properties, which ARM would
  // evaluate even when the secret is not deployed.
  { name: 'BROKER_ALERT_WEBHOOK_SECRET', value: '@Microsoft.KeyVault(VaultName=${vault.name};SecretName=broker-alert-webhook-secret)' }
])

// Only when set: the app registration admins sign in to (docs/deployment.md).
var signInSettings = empty(adminSignInClientId) ? [] : [
  { name: 'BROKER_SIGN_IN_CLIENT_ID', value: adminSignInClientId }
]

resource appSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: app
  name: 'appsettings'
  properties: toObject(concat(brokerSettings, webhookSettings, signInSettings), setting => setting.name, setting => setting.value)
  dependsOn: [
    appVaultRole
    appStorageRoles
    appTelemetryRole
    webhookSecret
  ]
}

// Alerting: one e-mail when a connection needs a person (a dead grant, repeated failures, a
// missing client secret).
//
// How the broker's log lines reach Application Insights: the Functions host reads the custom
// handler's stdout and stderr line by line and logs each line unchanged under the category
// "Host.Function.Console" (azure-functions-host src/WebJobs.Script/Workers/ProcessManagement/
// WorkerProcess.cs OnErrorDataReceived/BuildAndLogConsoleLog, src/WebJobs.Script/Workers/
// WorkerConsoleLogService.cs, WorkerConstants.ConsoleLogCategoryName). "Host." categories pass
// the host's logging filter (ScriptLoggingBuilderExtensions.cs, ScriptConstants
// SystemLogCategoryPrefixes), and the Application Insights logger writes a log without an
// exception as a trace: table `traces`, `message` = the line, customDimensions.Category =
// "Host.Function.Console" (azure-webjobs-sdk ApplicationInsightsLogger LogTrace). A stderr
// line containing "error" or "fail" gets severity Error, "warn" Warning, others Information.
// host.json's default log level (Information) lets them through; traces are subject to
// host.json's adaptive sampling, which only drops items under heavy load.
//
// The line: tracing's JSON format (BROKER_LOG_FORMAT=json above) puts
// "target":"token_broker::alert" and "fields":{"message":"connection_state_changed",
// "connection":"acme",…,"state":"consent_required",…}; the text format writes
// `token_broker::alert: connection_state_changed connection=acme … state=consent_required`.
// The query reads both. One alert per connection (dimension), evaluated every 5 minutes over
// the last 15 (room for ingestion delay). The rule is stateful (autoMitigate), so one bad
// transition mails once, not at every evaluation that still sees the line; its "Resolved"
// notice only means the line left the window, not that the connection recovered (that is the
// INFO line with state=connected). Properties as in learn.microsoft.com/azure/templates/
// microsoft.insights/2021-08-01/scheduledqueryrules.
var alertsEnabled = !empty(alertEmail)

var connectionStateQuery = '''
traces
| where message contains "connection_state_changed" and message contains "token_broker::alert"
| extend state = extract(@'(?:^|[^a-z_])state[=":]+([a-z_]+)', 1, message)
| extend connection = extract(@'(?:^|[^a-z_])connection[=":]+([^\s",}]+)', 1, message)
| where state in ("consent_required", "failing", "misconfigured")
| project timestamp, connection, state
'''

// Action groups are global resources (learn.microsoft.com/azure/templates/microsoft.insights/
// actiongroups); groupShortName is at most 12 characters.
resource alertActionGroup 'Microsoft.Insights/actionGroups@2022-06-01' = if (alertsEnabled) {
  name: 'ag-tb-${token}'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'tokenbroker'
    enabled: true
    emailReceivers: [
      {
        name: 'broker-admin'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

resource connectionStateAlert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = if (alertsEnabled) {
  name: 'alert-tb-${token}-connection-state'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Token Broker: a connection needs attention'
    description: 'A broker connection changed to consent_required (open /api/authorize/{connection}), failing, or misconfigured (for example its client secret is not in the vault). See the broker log line in the traces table.'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      allOf: [
        {
          query: connectionStateQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          dimensions: [
            {
              name: 'connection'
              operator: 'Include'
              values: [ '*' ]
            }
          ]
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: [
        alertActionGroup.id
      ]
    }
  }
}

// grant_expiring: a grant forecast to end soon (the timer's pass logs it once per connection
// and forecast date, WARN; see docs/operations.md, "When will my grant die?"). Hourly over the last two
// hours: a warning days ahead needs no 5-minute urgency. Same line shapes as above.
var grantExpiringQuery = '''
traces
| where message contains "grant_expiring" and message contains "token_broker::alert"
| extend connection = extract(@'(?:^|[^a-z_])connection[=":]+([^\s",}]+)', 1, message)
| extend expires_at = extract(@'(?:^|[^a-z_])expires_at[=":]+([0-9T:+\-]+)', 1, message)
| project timestamp, connection, expires_at
'''

resource grantExpiringAlert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = if (alertsEnabled) {
  name: 'alert-tb-${token}-grant-expiring'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Token Broker: a grant ends soon'
    description: 'A broker connection\'s grant is forecast to end within refresh.expiry_warning_days (an idle refresh token, the provider\'s limit, or the configured grant_lifetime_days). Reconnect it at /api/authorize/{connection} before expires_at.'
    severity: 3
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT1H'
    windowSize: 'PT2H'
    autoMitigate: true
    criteria: {
      allOf: [
        {
          query: grantExpiringQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          dimensions: [
            {
              name: 'connection'
              operator: 'Include'
              values: [ '*' ]
            }
          ]
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: [
        alertActionGroup.id
      ]
    }
  }
}

output functionAppName string = app.name
output publicUrl string = 'https://${app.properties.defaultHostName}'
output keyVaultUrl string = vault.properties.vaultUri
output keyVaultName string = vault.name
output principalId string = app.identity.principalId
